"""Embedded corpus snapshot (package data) and the script that regenerates it."""
