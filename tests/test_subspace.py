"""Subspace files: round trip, validation, model checks; rank rules and SVD methods."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spd import SpdError
from spd.linalg import RankRule, numerical_rank, svd_exact, svd_gram, svd_randomized, top_subspace
from spd.subspace import FORMAT, Subspace, weights_fingerprint


def orthonormal(d, r, gen):
    return torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64)).Q


def largest_angle(a, b):
    """Largest principal angle (radians) between the column spans of a and b (orthonormal)."""
    s = torch.linalg.svdvals(a.double().T @ b.double()).clamp(max=1.0)
    return math.acos(s.min().item())


def decaying(m, d, gen, gap_at=None):
    u = orthonormal(m, d, gen)
    v = orthonormal(d, d, gen)
    s = torch.logspace(0, -3, d, dtype=torch.float64)
    if gap_at:
        s[gap_at:] *= 1e-2
    return (u * s) @ v.T, v


def test_round_trip_keeps_everything(tmp_path, gen):
    bases = {(3, "k"): orthonormal(16, 5, gen), (3, "v"): orthonormal(16, 7, gen), (0, "k"): orthonormal(16, 1, gen)}
    svals = {site: torch.rand(16, generator=gen, dtype=torch.float64).sort(descending=True).values for site in bases}
    sub = Subspace(bases, svals, {"model": "m", "task": "arith", "n_examples": 3})
    sub.save(tmp_path / "s.safetensors")
    back = Subspace.load(tmp_path / "s.safetensors")
    assert back.sites == [(0, "k"), (3, "k"), (3, "v")] and back.layers == [0, 3]
    for site in bases:
        assert torch.equal(back.bases[site], bases[site].float())
        assert torch.equal(back.singular_values[site], svals[site].float())
    assert back.metadata == {"model": "m", "task": "arith", "n_examples": "3", "format": FORMAT}
    assert back.rank(3, "v") == 7 and back.d == 16
    assert back.content_hash() == sub.content_hash()
    torch.testing.assert_close(back.projector(3, "k") @ back.projector(3, "k"), back.projector(3, "k"),
                               rtol=0, atol=1e-5)


def test_energy_is_the_kept_share(gen):
    sv = torch.tensor([3.0, 2.0, 1.0, 0.0])
    sub = Subspace({(0, "k"): orthonormal(4, 2, gen)}, {(0, "k"): sv})
    assert sub.energy(0, "k") == pytest.approx(13 / 14)


def test_overlap_is_the_mean_squared_cosine_of_the_principal_angles(gen):
    a = orthonormal(12, 4, gen)
    inside = a[:, :2]  # a 2-D subspace of span(a)
    q = torch.linalg.qr(torch.cat([a, torch.randn(12, 3, generator=gen, dtype=torch.float64)], 1)).Q
    outside = q[:, 4:7]  # orthogonal to span(a)
    half = torch.cat([a[:, :1], outside[:, :1]], 1)  # one direction in, one out
    sub = Subspace({(0, "k"): a, (1, "v"): a, (2, "k"): a})
    other = Subspace({(0, "k"): inside, (1, "v"): outside, (2, "k"): half, (5, "v"): a})
    got = sub.overlap(other)
    assert sorted(got) == [(0, "k"), (1, "v"), (2, "k")]  # the sites both have
    assert got[0, "k"] == (pytest.approx(1.0), 4 / 12) and got[1, "v"][0] == pytest.approx(0.0, abs=1e-12)
    assert got[2, "k"][0] == pytest.approx(0.5)
    # the reference: the cosines of the principal angles are the singular values of A^T B
    cos = torch.linalg.svdvals(a.T @ half)
    assert got[2, "k"][0] == pytest.approx(float((cos**2).mean()))
    assert other.overlap(sub)[2, "k"][0] == pytest.approx(got[2, "k"][0])  # symmetric
    with pytest.raises(SpdError, match="different widths"):
        sub.overlap(Subspace({(0, "k"): orthonormal(8, 2, gen)}))
    with pytest.raises(SpdError, match="share no layer"):
        sub.overlap(Subspace({(7, "k"): a}))


def test_random_like_keeps_sites_ranks_and_model_and_sits_at_chance(gen):
    like = Subspace({(3, "k"): orthonormal(64, 32, gen), (3, "v"): orthonormal(64, 16, gen)},
                    {(3, "k"): torch.ones(64)}, {"model": "m", "fingerprint": "abc", "task": "gsm8k", "loss": "aligned"})
    rnd = Subspace.random_like(like, seed=1)
    assert rnd.sites == like.sites and [rnd.rank(*s) for s in rnd.sites] == [32, 16] and rnd.d == 64
    assert rnd.metadata["fingerprint"] == "abc" and rnd.metadata["source"] == "random"
    assert rnd.metadata["like"] == "gsm8k" and "loss" not in rnd.metadata and not rnd.singular_values
    rnd.check_orthonormal(tol=1e-6)
    assert torch.equal(Subspace.random_like(like, seed=1).bases[3, "k"], rnd.bases[3, "k"])  # seeded
    assert not torch.equal(Subspace.random_like(like, seed=2).bases[3, "k"], rnd.bases[3, "k"])
    # uniformly random: the overlap with a fixed subspace averages max(r_a, r_b) / d over seeds
    mean = sum(Subspace.random_like(like, seed=s).overlap(like)[3, "k"][0] for s in range(40)) / 40
    assert like.overlap(rnd)[3, "k"][1] == 0.5 and mean == pytest.approx(0.5, abs=0.02)


def test_from_bases_without_metadata_warns_on_model_check(gen):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = LlamaForCausalLM(cfg)
    sub = Subspace.from_bases({(1, "v"): orthonormal(16, 4, gen)})
    with pytest.warns(UserWarning, match="no model fingerprint"):
        sub.check_model(model)


def tiny(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return LlamaForCausalLM(cfg)


def test_model_check_catches_other_models(gen):
    a, b = tiny(0), tiny(1)
    sub = Subspace({(2, "k"): orthonormal(16, 4, gen)}, metadata={"fingerprint": weights_fingerprint(a, [2])})
    sub.check_model(a)
    with pytest.raises(SpdError, match="made for another model"):
        sub.check_model(b)
    wide = Subspace({(2, "k"): orthonormal(32, 4, gen)}, metadata={"fingerprint": "x"})
    with pytest.raises(SpdError, match="d_kv=32 but the model has d_kv=16"):
        wide.check_model(a)
    deep = Subspace({(5, "k"): orthonormal(16, 4, gen)}, metadata={"fingerprint": "x"})
    with pytest.raises(SpdError, match="targets layer 5 but the model has 3 layers"):
        deep.check_model(a)


def test_fingerprint_ignores_dtype_but_not_weights():
    a = tiny(0)
    fp = weights_fingerprint(a, [0, 2])
    assert weights_fingerprint(a.to(torch.bfloat16), [0, 2]) == fp
    with torch.no_grad():
        a.to(torch.float32).model.layers[2].self_attn.v_proj.weight[0, 0] += 0.5
    assert weights_fingerprint(a, [0, 2]) != fp
    assert weights_fingerprint(a, [0]) == weights_fingerprint(tiny(0), [0])


@pytest.mark.parametrize("problem, message", [
    ("not_orthonormal", "not orthonormal"),
    ("nan", "not orthonormal"),
    ("wrong_format", "format is"),
    ("bad_name", "unexpected tensor"),
    ("r_gt_d", r"must be \[d, r\] with 1 <= r <= d"),
    ("garbage", "not a safetensors subspace file"),
    ("missing", "does not exist"),
])
def test_load_validates(tmp_path, gen, problem, message):
    from safetensors.torch import save_file

    path = tmp_path / "s.safetensors"
    basis = orthonormal(8, 3, gen).float().contiguous()
    tensors, meta = {"layers.1.k.basis": basis}, {"format": FORMAT}
    if problem == "not_orthonormal":
        tensors["layers.1.k.basis"] = basis * 1.01
    elif problem == "nan":
        tensors["layers.1.k.basis"] = basis.clone().fill_(float("nan"))
    elif problem == "wrong_format":
        meta["format"] = "something/else"
    elif problem == "bad_name":
        tensors["layers.1.q.basis"] = basis.clone()
    elif problem == "r_gt_d":
        tensors["layers.1.k.basis"] = torch.randn(3, 8)
    if problem == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif problem != "missing":
        save_file(tensors, path, metadata=meta)
    with pytest.raises(SpdError, match=message) as err:
        Subspace.load(path)
    assert "\n" not in str(err.value)


def test_rank_rules():
    sv = torch.tensor([4.0, 3.0, 2.0, 1.0, 1e-9, 0.0])
    assert numerical_rank(sv) == 4
    assert RankRule.parse("half").choose(sv, 6) == 2
    assert RankRule.parse("3").choose(sv, 6) == 3
    assert RankRule.parse("energy:0.8").choose(sv, 6) == 2  # (16+9)/30 = 0.83
    assert RankRule.parse("energy:1").choose(sv, 6) == 4
    for bad in ("0", "energy:1.5", "most", "-3"):
        with pytest.raises(SpdError, match="rank"):
            RankRule.parse(bad)
    with pytest.raises(SpdError, match="larger than d_kv = 6"):
        RankRule.parse("7").check(6)


def test_gram_matches_exact_to_1e6_rad(gen):
    g, _ = decaying(3000, 64, gen, gap_at=32)
    v_exact, s_exact = svd_exact(g)
    v_gram, s_gram = svd_gram(g.T @ g)
    assert largest_angle(v_exact[:, :32], v_gram[:, :32]) <= 1e-6
    torch.testing.assert_close(s_gram[:32], s_exact[:32], rtol=1e-8, atol=0)


def test_randomized_matches_exact_to_1e3_rad(gen):
    g, _ = decaying(2000, 96, gen, gap_at=24)
    v_exact, s_exact = svd_exact(g)
    v_rand, s_rand = svd_randomized(g, 24, oversample=16, niters=4, seed=3)
    assert v_rand.shape == (96, 24)
    torch.testing.assert_close(v_rand.T @ v_rand, torch.eye(24, dtype=torch.float64), rtol=0, atol=1e-8)
    assert largest_angle(v_exact[:, :24], v_rand) <= 1e-3
    torch.testing.assert_close(s_rand, s_exact[:24], rtol=1e-4, atol=0)


def test_top_subspace_errors_beyond_numerical_rank(gen):
    g = torch.randn(5, 16, generator=gen, dtype=torch.float64)  # rank 5
    with pytest.raises(SpdError, match="exceeds the numerical rank 5"):
        top_subspace("gram", RankRule.parse("8"), 16, gram=g.T @ g)
    basis, sv = top_subspace("exact", RankRule.parse("half"), 16, rows=g)
    assert basis.shape == (16, 2) and basis.dtype == torch.float32
