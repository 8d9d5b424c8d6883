"""The lm-eval model adapter on a real (tiny, briefly trained) MoPE checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from eval_testing import instance

DOCS = [
    "The built-in function len returns the number of items of an object.",
    "Lists are mutable sequences, typically used to store collections of homogeneous items.",
    "A",
    "Raise an exception if the argument is not an integer.\nOtherwise return it unchanged.",
]


@pytest.fixture(scope="module")
def lm(eval_checkpoints):
    from mpmoe.eval.lm import MpmoeLM

    model = MpmoeLM(load=str(eval_checkpoints["trained"]), batch_size=3, progress=False)
    yield model
    model.close()


def _ll(lm, pairs):
    return lm.loglikelihood([instance("loglikelihood", p) for p in pairs], disable_tqdm=True)


def test_loads_the_checkpoint_as_trained(lm, eval_checkpoints):
    em = lm.em
    assert em.iteration == 60 and em.routing == "mope" and em.trained_routing == "mope"
    assert em.checkpoint.name == "iter_0000060"
    assert lm.max_length == 128 and em.vocab_size == 8192 and em.dtype == torch.float32
    # the routers carry a learned Sigma (not the identity it starts from)
    from mpmoe.megatron.router import MoPERouter, iter_routers

    routers = [r for r in iter_routers(em.model) if isinstance(r, MoPERouter)]
    assert len(routers) == 2
    sigma = routers[0].current_sigma()
    assert not torch.allclose(sigma, torch.eye(sigma.shape[0], dtype=sigma.dtype))


def test_rolling_equals_loglikelihood_of_empty_context(lm):
    rolling = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (d,)) for d in DOCS],
                                       disable_tqdm=True)
    direct = _ll(lm, [("", d) for d in DOCS])
    for r, (d, _) in zip(rolling, direct):
        assert r == pytest.approx(d, rel=1e-5, abs=1e-4)
        assert r < 0


def test_rolling_windows_cover_a_long_document_once(lm):
    """A document of 3+ contexts: the windows' predictions are exactly its tokens, so the
    total equals the sum over disjoint windows, each conditioned on <=1 context window."""
    text = " ".join(DOCS * 12)
    tokens = lm.tok_encode(text)
    assert len(tokens) > 3 * lm.max_length
    (total,) = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (text,))], disable_tqdm=True)
    # by hand: first window predicts tokens[0:L] from [EOD] + tokens[:L-1]; later windows
    # predict the next <=L tokens from the L tokens before them
    L = lm.max_length
    reqs = [(None, [lm.eot_token_id], tokens[:L])]
    start = L
    while start < len(tokens):
        end = min(start + L, len(tokens))
        window = tokens[max(0, end - L - 1): end]  # up to L+1 tokens: input = all but last
        n = end - start
        reqs.append((None, window[:-n], window[-n:]))
        start = end
    manual = sum(s for s, _ in lm._loglikelihood_tokens(reqs, disable_tqdm=True))
    assert total == pytest.approx(manual, rel=1e-5)
    assert math.isfinite(total) and total < 0


def test_batching_and_padding_do_not_change_scores(lm):
    pairs = [("The built-in function", " len returns the number"), ("Lists are", " mutable"),
             ("A" * 3, " b"), ("Raise an exception if the argument is not", " an integer."),
             ("", "Lists are mutable sequences")]
    lm.batch_size = 1
    one = _ll(lm, pairs)
    lm.batch_size = 5
    batched = _ll(lm, pairs)
    lm.batch_size = 3
    for (a, ga), (b, gb) in zip(one, batched):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
        assert ga == gb


def test_loglikelihood_is_a_log_probability(lm):
    """The continuation's score is the sum of per-token log-probabilities over the real
    vocabulary: exp over all single-token continuations sums to 1."""
    ctx = lm.tok_encode("The built-in function")
    vocab = lm.em.vocab_size
    reqs = [(None, ctx, [t]) for t in range(vocab)]
    lm.batch_size = 512
    scores = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    lm.batch_size = 3
    total = sum(math.exp(s) for s, _ in scores)
    assert total == pytest.approx(1.0, abs=1e-3)
    assert sum(g for _, g in scores) == 1  # exactly one token is the greedy one


def _gen(lm, contexts, **kwargs):
    return lm.generate_until([instance("generate_until", (c, dict(kwargs))) for c in contexts],
                             disable_tqdm=True)


def test_generation_kv_cache_matches_recomputation(lm):
    contexts = ["The built-in function", "Lists are mutable sequences, typically used to",
                "Raise an exception", "x"]
    lm.kv_cache = True
    cached = _gen(lm, contexts, until=["\n\n"], max_gen_toks=24)
    lm.kv_cache = False
    plain = _gen(lm, contexts, until=["\n\n"], max_gen_toks=24)
    lm.kv_cache = True
    assert cached == plain
    assert any(len(t) > 0 for t in cached)
    # batch of one gives the same text as in a batch (longer prompts teacher-forced)
    lm.batch_size = 1
    single = _gen(lm, contexts, until=["\n\n"], max_gen_toks=24)
    lm.batch_size = 3
    assert single == cached


def test_generation_greedy_matches_argmax_of_loglikelihood(lm):
    prompts = [lm.tok_encode("The built-in function"), lm.tok_encode("Lists are mutable sequences")]
    _, generated = lm._greedy(prompts, [], 6)
    for prompt, gen in zip(prompts, generated):
        assert 1 <= len(gen) <= 6
        reqs = [(None, prompt + gen[:i], [gen[i]]) for i in range(len(gen))]
        assert all(greedy for _, greedy in lm._loglikelihood_tokens(reqs, disable_tqdm=True))


def test_generation_stops(lm):
    (free,) = _gen(lm, ["Lists are"], max_gen_toks=30, until=[])
    assert len(lm.tok_encode(free)) <= 30
    (capped,) = _gen(lm, ["Lists are"], max_gen_toks=3, until=[])
    assert len(lm.tok_encode(capped)) <= 3 and free.startswith(capped)
    # a stop string that occurs in the free text cuts there and is not included
    assert len(free) >= 2, free
    stop = free[1]
    (cut,) = _gen(lm, ["Lists are"], max_gen_toks=30, until=[stop])
    assert stop not in cut and free.startswith(cut)


def test_edge_requests_are_scored_not_fatal(lm):
    """A context of only whitespace (moved into the continuation: no context tokens) is scored
    like an empty context; a continuation of no tokens scores 0.0 and is greedy."""
    (ws, _), (empty_ctx, _), (nothing, greedy) = _ll(lm, [("  \n", "Lists"), ("", "  \nLists"), ("Lists", "")])
    assert math.isfinite(ws) and ws < 0
    assert ws == pytest.approx(empty_ctx, rel=1e-5)
    assert (nothing, greedy) == (0.0, True)
    # mixed into a batch with ordinary requests, the others keep their scores
    alone = _ll(lm, [("Lists are", " mutable")])
    mixed = _ll(lm, [("Lists", ""), ("Lists are", " mutable"), (" ", "x")])
    assert mixed[1][0] == pytest.approx(alone[0][0], rel=1e-5) and mixed[0] == (0.0, True)


def test_long_generation_prompt_is_left_truncated_and_logged_once(lm, caplog):
    text = " ".join(DOCS * 8)
    ids = lm.tok_encode(text)
    room = lm.max_length - 16
    assert len(ids) > room
    inst = instance("generate_until", (text, {"max_gen_toks": 16}))
    assert lm._prompt(inst, 16) == ids[-room:]
    lm._warned_truncation = False  # _prompt above logged once already
    caplog.clear()
    with caplog.at_level("WARNING", logger="mpmoe.eval.lm"):
        _gen(lm, [text, text + " again"], max_gen_toks=16, until=["\n"])
    logged = [r for r in caplog.records if "left truncation" in r.getMessage()]
    assert len(logged) == 1 and str(room) in logged[0].getMessage()
    # max_gen_toks >= max_length (lm-eval's HF model refuses it): the prompt keeps half the context
    assert len(lm._prompt(inst, lm.max_length + 5)) == lm.max_length // 2


def test_sampling_is_refused_with_a_clear_error(lm):
    from mpmoe.eval.errors import EvalError

    with pytest.raises(EvalError, match="greedily"):
        _gen(lm, ["x"], do_sample=True, temperature=0.7)


def test_topk_routing_on_the_same_checkpoint(eval_checkpoints, lm):
    """routing=topk loads the same weights and Sigma but routes by probability: scores move."""
    from mpmoe.eval.lm import MpmoeLM

    pairs = [("", d) for d in DOCS]
    mope = _ll(lm, pairs)
    topk_lm = MpmoeLM(load=str(eval_checkpoints["trained"]), routing="topk", batch_size=3,
                      progress=False)
    try:
        assert topk_lm.em.routing == "topk"
        topk = _ll(topk_lm, pairs)
    finally:
        topk_lm.close()
    assert any(abs(a - b) > 1e-4 for (a, _), (b, _) in zip(mope, topk))


def test_bf16_is_close_to_fp32(eval_checkpoints, lm):
    from mpmoe.eval.lm import MpmoeLM

    pairs = [("The built-in function", " len returns the number"), ("", DOCS[1])]
    ref = _ll(lm, pairs)
    bf = MpmoeLM(load=str(eval_checkpoints["trained"]), dtype="bf16", batch_size=2, progress=False)
    try:
        assert bf.em.dtype == torch.bfloat16
        got = _ll(bf, pairs)
        (text,) = _gen(bf, ["Lists are"], max_gen_toks=4, until=[])
    finally:
        bf.close()
    for (a, _), (b, _) in zip(ref, got):
        assert b == pytest.approx(a, rel=0.05)
    assert isinstance(text, str)


def test_routing_dump_of_evaluation_forwards(eval_checkpoints, tmp_path):
    import numpy as np

    from mpmoe.eval.lm import MpmoeLM

    dump = tmp_path / "dump"
    model = MpmoeLM(load=str(eval_checkpoints["trained"]), routing_dump_dir=str(dump), batch_size=2,
                    progress=False)
    try:
        _ll(model, [("Lists are", " mutable sequences"), ("The", " built-in function len")])
        k = model.em.args.moe_router_topk
    finally:
        model.close()
    files = sorted(p.name for p in dump.iterdir())
    assert files == ["layer2_rank0_fwd000000.npz", "layer3_rank0_fwd000000.npz"]
    with np.load(dump / files[0]) as z:
        experts, weights = z["experts"], z["weights"]
    assert experts.shape[1] == k and weights.shape == experts.shape
    # one forward of a right-padded batch: padding positions route nowhere (-1)
    padded = (experts == -1).all(axis=1)
    assert 0 < padded.sum() < len(padded)
    routed = weights[~padded]
    np.testing.assert_allclose(routed.sum(axis=1), 1.0, rtol=1e-5)


def test_knockout_and_dynamic_mask_at_evaluation(eval_checkpoints, tmp_path):
    import numpy as np

    from mpmoe.eval.errors import EvalError
    from mpmoe.eval.lm import MpmoeLM

    dump = tmp_path / "dump"
    model = MpmoeLM(load=str(eval_checkpoints["trained"]), routing_dump_dir=str(dump), batch_size=2,
                    progress=False, routing_ablation={"moe_mask_experts": "2:0,1", "moe_dynamic_mask": "random",
                                                      "moe_dynamic_mask_layers": "3"})
    try:
        _ll(model, [("Lists are", " mutable sequences")])
        k = model.em.args.moe_router_topk
    finally:
        model.close()
    with np.load(dump / "layer2_rank0_fwd000000.npz") as z:
        assert not np.isin(z["experts"], [0, 1]).any()
        assert ((z["experts"] >= 0).sum(axis=1) == k).all()
    with np.load(dump / "layer3_rank0_fwd000000.npz") as z:  # k -> k-1
        assert ((z["experts"] >= 0).sum(axis=1) == k - 1).all()
    with pytest.raises(EvalError, match="--moe-mask-experts: layer 2: expert ids \\[99\\]"):
        MpmoeLM(load=str(eval_checkpoints["trained"]), progress=False,
                routing_ablation={"moe_mask_experts": "2:99"})


def test_bad_arguments_are_one_line_errors(eval_checkpoints, tmp_path):
    from mpmoe.eval.errors import EvalError
    from mpmoe.eval.lm import MpmoeLM

    with pytest.raises(EvalError, match="no such checkpoint"):
        MpmoeLM(load=str(tmp_path / "nope"), progress=False)
    with pytest.raises(EvalError, match="batch_size 'auto'"):
        MpmoeLM(load=str(eval_checkpoints["trained"]), batch_size="auto")
    with pytest.raises(EvalError, match="unknown argument"):
        MpmoeLM(load=str(eval_checkpoints["trained"]), pretrained="gpt2")
    with pytest.raises(EvalError, match="not the requested"):
        MpmoeLM(load=str(eval_checkpoints["trained"] / "iter_0000060"), ckpt_step=5, progress=False)


def test_mope_routing_needs_a_mope_checkpoint(tmp_path, embedded_cache):
    # last in this file: training in this process tears megatron's groups down after it
    from eval_testing import train_checkpoint
    from mpmoe.eval.errors import EvalError
    from mpmoe.eval.lm import MpmoeLM

    save = train_checkpoint(tmp_path / "topk", embedded_cache, iters=1,
                            extra=["--moe-router-load-balancing-type", "aux_loss"])
    with pytest.raises(EvalError, match="no Sigma"):
        MpmoeLM(load=str(save), routing="mope", progress=False)
    model = MpmoeLM(load=str(save / "iter_0000001"), routing="auto", progress=False)
    try:
        assert model.em.routing == "topk" and model.em.trained_routing == "topk"
    finally:
        model.close()

