"""Layer specs for GPT MoE / MoPE models on stock megatron-core.

Per decoder layer the builder chooses one of four kinds:

* ``"dense"``: an ordinary MLP;
* ``"moe"``: megatron's ``MoELayer`` with the top-k statistics router;
* ``"mope"``: ``MoELayer`` with the MoPE (OTEP) router;
* ``"remoe"``: ``MoELayer`` with the ReMoE (ReLU) router.

Which layers are MoE follows ``config.moe_layer_freq`` with Megatron's semantics: an int
``N`` makes layer ``i`` (0-based) an expert layer when ``i % N == 0``; a list gives one
0/1 entry per layer. Layers without experts (``num_moe_experts`` unset) are all dense. An
expert layer's kind is its router kind's statistics tag (:mod:`mpmoe.megatron.routers`);
its router is the registry's class for that kind.

Three backends (all through megatron's ``BackendSpecProvider`` protocol):

* ``te``: Transformer Engine modules (fused layer-norm linears, ``TEDotProductAttention``,
  TE grouped experts when ``moe_grouped_gemm``). Needs TE and CUDA.
* ``local``: megatron-core's own modules (``DotProductAttention``), CUDA.
* ``portable``: megatron-core's modules with :class:`~mpmoe.megatron.attention.SDPAttention`
  as core attention and ``torch.nn`` norms; runs on CPU (and on GPU).

``use_te=None`` / ``portable=None`` choose automatically: TE when it is importable and
CUDA is available, portable when CUDA is absent, local otherwise.
"""

from __future__ import annotations

import importlib.util
from typing import List, Optional, Sequence

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from mpmoe.megatron import routers
from mpmoe.megatron.attention import SDPAttention
from mpmoe.megatron.compat import mlp_spec_for_backend, moe_submodules, replace_experts

__all__ = [
    "DENSE",
    "MOE",
    "MOPE",
    "PortableSpecProvider",
    "default_router_classes",
    "get_gpt_block_spec",
    "get_gpt_layer_specs",
    "layer_kinds",
    "moe_layer_pattern",
    "resolve_backend",
]

DENSE, MOE, MOPE, REMOE = "dense", "moe", "mope", "remoe"


class PortableSpecProvider(LocalSpecProvider):
    """megatron-core's local modules, with device-agnostic attention and norms.

    * core attention: :class:`SDPAttention` (PyTorch SDPA) instead of
      ``DotProductAttention`` (CUDA global buffer, CUDA default causal mask);
    * norms: ``WrappedTorchNorm`` (``torch.nn.LayerNorm``/``RMSNorm``) instead of Apex's
      fused layer norm when Apex happens to be installed.
    """

    def core_attention(self) -> type:
        return SDPAttention

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return WrappedTorchNorm


def have_te() -> bool:
    """True when Transformer Engine is importable."""
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_backend(use_te: Optional[bool] = None, portable: Optional[bool] = None) -> str:
    """Return ``"te"``, ``"local"`` or ``"portable"`` for the requested flags.

    ``None`` means "choose": ``portable`` defaults to "no CUDA", ``use_te`` to
    "Transformer Engine importable and CUDA available". Explicit ``True`` wins; asking for
    both, or for TE without TE installed, is an error.
    """
    cuda = torch.cuda.is_available()
    if use_te and portable:
        raise ValueError("use_te=True and portable=True are exclusive")
    if use_te:
        if not have_te():
            raise ValueError("use_te=True but Transformer Engine is not installed")
        return "te"
    if portable:
        return "portable"
    if portable is None and not cuda:
        return "portable"
    if use_te is None and cuda and have_te():
        return "te"
    return "local"


def _backend_provider(backend: str) -> BackendSpecProvider:
    if backend == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    if backend == "local":
        return LocalSpecProvider()
    if backend == "portable":
        return PortableSpecProvider()
    raise ValueError(f"unknown backend {backend!r}")


def moe_layer_pattern(config: TransformerConfig) -> List[int]:
    """0/1 per decoder layer (1 = expert layer), Megatron's ``moe_layer_freq`` semantics."""
    n = config.num_layers
    if not config.num_moe_experts:
        return [0] * n
    freq = config.moe_layer_freq
    if isinstance(freq, bool):
        raise ValueError(f"moe_layer_freq must be an int or a list of 0/1, got {freq!r}")
    if isinstance(freq, int):
        if freq < 1:
            raise ValueError(f"moe_layer_freq must be >= 1, got {freq}")
        return [1 if i % freq == 0 else 0 for i in range(n)]
    if isinstance(freq, (list, tuple)):
        pattern = [int(x) for x in freq]
        if len(pattern) != n:
            raise ValueError(
                f"moe_layer_freq has {len(pattern)} entries, expected num_layers={n}"
            )
        if any(x not in (0, 1) for x in pattern):
            raise ValueError(f"moe_layer_freq entries must be 0 or 1, got {list(freq)}")
        return pattern
    raise ValueError(f"moe_layer_freq must be an int or a list of 0/1, got {freq!r}")


def _is_mope(config: TransformerConfig) -> bool:
    return routers.kind_of(config) == "mope"


def layer_kinds(config: TransformerConfig) -> List[str]:
    """``"dense"`` or the router kind's statistics tag (``"moe"``, ``"mope"``, ``"remoe"``)
    for every decoder layer of the model (all stages)."""
    expert_kind = routers.KINDS[routers.kind_of(config)].stats_tag
    return [expert_kind if p else DENSE for p in moe_layer_pattern(config)]


def default_router_classes():
    """``(moe_router, mope_router)``: the registry's top-k and MoPE router classes."""
    return routers.router_class("topk"), routers.router_class("mope")


def _attention_spec(backend: BackendSpecProvider, config: TransformerConfig) -> ModuleSpec:
    rms = config.normalization == "RMSNorm"
    qk_norm = backend.layer_norm(rms_norm=rms, for_qk=True) if config.qk_layernorm else IdentityOp
    fused = backend.fuse_layernorm_and_linear()
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=(
                backend.column_parallel_layer_norm_linear()
                if fused
                else backend.column_parallel_linear()
            ),
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def _mlp_spec(
    backend: BackendSpecProvider,
    config: TransformerConfig,
    kind: str,
    moe_router: type,
    mope_router: Optional[type],
    layer_number: Optional[int] = None,
):
    """megatron's MLP / MoELayer spec for ``kind`` (a ``ModuleSpec`` or, from 0.18, a
    builder; read it with :func:`mpmoe.megatron.compat.moe_submodules`). A layer listed in
    ``moe_expert_ffn_sizes`` gets experts of those sizes (:mod:`mpmoe.megatron.hetero`)."""
    if kind == DENSE:
        return mlp_spec_for_backend(backend, config, num_experts=None)
    spec = mlp_spec_for_backend(backend, config, num_experts=config.num_moe_experts)
    moe = moe_submodules(spec)
    if kind == MOPE:
        if mope_router is None:
            raise ValueError(
                "moe_router_load_balancing_type='otep' needs the MoPE router "
                "(mpmoe.megatron.router.MoPERouter), which is not available"
            )
        moe.router = mope_router
    elif kind == MOE:
        moe.router = moe_router
    else:
        moe.router = routers.router_class(routers.kind_of(config))
    if config.moe_shared_expert_intermediate_size is None:
        moe.shared_experts = None
    from mpmoe.megatron.hetero import HeteroSequentialMLP, layer_expert_sizes

    sizes = layer_expert_sizes(config, layer_number)
    if sizes is not None:
        if config.moe_grouped_gemm:
            raise ValueError("moe_expert_ffn_sizes (experts of different sizes) cannot run with "
                             "moe_grouped_gemm (equal sizes only); turn grouped GEMM off")
        replace_experts(moe, HeteroSequentialMLP, expert_sizes=tuple(sizes), layer_number=layer_number)
    from mpmoe.megatron.surgery import apply_surgery_spec

    apply_surgery_spec(moe, config)  # merged / compressed experts (mpmoe experts)
    return spec


def _layer_spec(
    backend: BackendSpecProvider,
    config: TransformerConfig,
    kind: str,
    moe_router: type,
    mope_router: Optional[type],
    layer_number: Optional[int] = None,
) -> ModuleSpec:
    rms = config.normalization == "RMSNorm"
    fused = backend.fuse_layernorm_and_linear()
    norm = backend.layer_norm(rms_norm=rms, for_qk=False)
    # With fused layer-norm linears (TE) the norm lives inside linear_qkv / linear_fc1;
    # MoE layers still need their own pre-MLP norm (the router reads normalised input).
    needs_pre_mlp_norm = (not fused) or kind != DENSE
    submodules = TransformerLayerSubmodules(
        input_layernorm=IdentityOp if fused else norm,
        self_attention=_attention_spec(backend, config),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=norm if needs_pre_mlp_norm else IdentityOp,
        mlp=_mlp_spec(backend, config, kind, moe_router, mope_router, layer_number),
        mlp_bda=get_bias_dropout_add,
    )
    if not fused:
        # Checkpoints interchangeable with the fused (TE) layout, as megatron's local spec.
        submodules.sharded_state_dict_keys_map = {
            "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
            "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
        } if kind == DENSE else {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
    return ModuleSpec(module=TransformerLayer, submodules=submodules)


def get_gpt_layer_specs(
    config: TransformerConfig,
    *,
    use_te: Optional[bool] = None,
    portable: Optional[bool] = None,
    moe_router: Optional[type] = None,
    mope_router: Optional[type] = None,
) -> List[ModuleSpec]:
    """One ``TransformerLayer`` spec per decoder layer of the whole model.

    Args:
        config: the model config (``TransformerConfig`` or ``MoPEConfig``).
        use_te / portable: backend choice, ``None`` = automatic (see module doc).
        moe_router / mope_router: router classes for top-k / MoPE expert layers (both
            ``TopKRouter`` subclasses with its ``(config, pg_collection=None)``
            constructor). Default: :func:`default_router_classes`.
    """
    backend = _backend_provider(resolve_backend(use_te, portable))
    if moe_router is None or (mope_router is None and _is_mope(config)):
        default_moe, default_mope = default_router_classes()
        moe_router = moe_router or default_moe
        mope_router = mope_router or default_mope
    if config.num_moe_experts:
        check_expert_parallel(config)
    kinds = layer_kinds(config)
    from mpmoe.surgery.split import parse_expert_sizes

    sizes = parse_expert_sizes(getattr(config, "moe_expert_ffn_sizes", None)) or {}
    bad = sorted(layer for layer in sizes if layer > len(kinds) or kinds[layer - 1] == DENSE)
    if bad:
        raise ValueError(f"moe_expert_ffn_sizes names layers {bad} that have no experts")
    return [_layer_spec(backend, config, k, moe_router, mope_router, i + 1) for i, k in enumerate(kinds)]


def check_expert_parallel(config: TransformerConfig) -> None:
    """Experts divide evenly over expert-parallel ranks and k <= experts (one-line ValueError)."""
    ep = config.expert_model_parallel_size
    if config.num_moe_experts % ep != 0:
        raise ValueError(
            f"num_moe_experts={config.num_moe_experts} is not divisible by "
            f"expert_model_parallel_size={ep}"
        )
    from mpmoe.megatron.surgery import router_width

    if config.moe_router_topk > router_width(config):  # merged experts: the router's E
        raise ValueError(
            f"moe_router_topk={config.moe_router_topk} > num_moe_experts={config.num_moe_experts}"
        )


def get_gpt_block_spec(
    config: TransformerConfig,
    *,
    use_te: Optional[bool] = None,
    portable: Optional[bool] = None,
    moe_router: Optional[type] = None,
    mope_router: Optional[type] = None,
    layer_specs: Optional[Sequence[ModuleSpec]] = None,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Decoder block spec for this pipeline stage (layers sliced as megatron does).

    ``layer_specs`` (all layers of the model) defaults to :func:`get_gpt_layer_specs`.
    """
    backend_name = resolve_backend(use_te, portable)
    if layer_specs is None:
        layer_specs = get_gpt_layer_specs(
            config,
            use_te=backend_name == "te",
            portable=backend_name == "portable",
            moe_router=moe_router,
            mope_router=mope_router,
        )
    layer_specs = list(layer_specs)
    if len(layer_specs) != config.num_layers:
        raise ValueError(
            f"got {len(layer_specs)} layer specs for num_layers={config.num_layers}"
        )
    if config.pipeline_model_parallel_layout is not None:
        raise ValueError("pipeline_model_parallel_layout is not supported by mpmoe's block spec")
    num_local = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    backend = _backend_provider(backend_name)
    final_norm = backend.layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=False)
    return TransformerBlockSubmodules(
        layer_specs=layer_specs[offset : offset + num_local], layer_norm=final_norm
    )
