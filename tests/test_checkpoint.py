"""Published checkpoints: layout, round trip, and clear errors on bad files."""
from __future__ import annotations

import pytest
import torch

import tbg
from tbg.nn.checkpoint import INVERSE_PREFIX, PREFIX, CheckpointError
from spec import spec_velocity


def published_checkpoint(n_features: int, hidden: int, n_layers: int) -> dict:
    """A checkpoint built from the layout description in docs/model.md alone (random values)."""
    H, shapes = hidden, {"embedding.weight": (hidden, n_features + 1), "embedding.bias": (hidden,),
                         "embedding_out.weight": (n_features + 1, hidden), "embedding_out.bias": (n_features + 1,)}
    for layer in range(n_layers):
        p = f"gcl_{layer}."
        shapes |= {p + "edge_mlp.0.weight": (H, 2 * H + 2), p + "edge_mlp.0.bias": (H,),
                   p + "edge_mlp.2.weight": (H, H), p + "edge_mlp.2.bias": (H,),
                   p + "node_mlp.0.weight": (H, 2 * H), p + "node_mlp.0.bias": (H,),
                   p + "node_mlp.2.weight": (H, H), p + "node_mlp.2.bias": (H,),
                   p + "coord_mlp.0.weight": (H, H), p + "coord_mlp.0.bias": (H,), p + "coord_mlp.2.weight": (1, H),
                   p + "att_mlp.0.weight": (1, H), p + "att_mlp.0.bias": (1,)}
    egnn = {k: torch.randn(s) / s[-1] ** 0.5 for k, s in shapes.items()}
    flow = {PREFIX + k: v for k, v in egnn.items()} | {INVERSE_PREFIX + k: v for k, v in egnn.items()}
    return {"model_state_dict": flow, "optimizer_state_dict": {"state": {}, "param_groups": []}, "epoch": 3,
            "global_it": 1000}


def test_load_published_layout_gives_spec_outputs(tmp_path) -> None:
    ckpt = published_checkpoint(n_features=7, hidden=12, n_layers=3)
    path = tmp_path / "published.pt"
    torch.save(ckpt, path)
    features = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 2, 2, 3, 4, 5, 6, 1]), 7).double()
    dyn = tbg.load_published(path, features, backend="reference")
    assert (dyn.egnn.hidden, dyn.egnn.n_layers, dyn.egnn.n_features) == (12, 3, 7)
    x = torch.randn(4, 30, dtype=torch.float64)
    v = dyn(torch.full((4, 1), 0.6, dtype=torch.float64), x)
    state = {k[len(PREFIX):]: t.double() for k, t in ckpt["model_state_dict"].items() if k.startswith(PREFIX)}
    for b in range(4):
        torch.testing.assert_close(v[b].view(10, 3), spec_velocity(state, 3, features, 0.6, x[b].view(10, 3)),
                                   rtol=1e-10, atol=1e-10)
    # A state dict given directly loads the same way.
    torch.testing.assert_close(tbg.load_published(ckpt, features, backend="reference")(0.6, x), v)


def test_round_trip_through_our_writer(tmp_path) -> None:
    model = tbg.EGNN(5, 16, 2)
    tbg.save_published(tmp_path / "ours.pt", model, step=17)
    raw = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert raw["step"] == 17 and raw["tbg"]["coords_range"] == 15.0
    assert all(k.startswith((PREFIX, INVERSE_PREFIX)) for k in raw["model_state_dict"])
    f = torch.randn(6, 5)
    loaded = tbg.load_published(tmp_path / "ours.pt", f)
    x = torch.randn(3, 6, 3)
    torch.testing.assert_close(loaded(0.3, x), tbg.BoundDynamics(model, f)(0.3, x), rtol=0, atol=0)


def test_corrupt_and_mismatched_files(tmp_path) -> None:
    ckpt = published_checkpoint(3, 8, 2)
    with pytest.raises(FileNotFoundError):
        tbg.load_published(tmp_path / "missing.pt", torch.randn(4, 3))
    good = tmp_path / "good.pt"
    torch.save(ckpt, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a readable"):
        tbg.load_published(truncated, torch.randn(4, 3))

    bad_shape = {**ckpt["model_state_dict"], PREFIX + "gcl_1.edge_mlp.2.weight": torch.randn(8, 9)}
    with pytest.raises(CheckpointError, match=r"gcl_1\.edge_mlp\.2\.weight.*\[8, 9\].*\[8, 8\]"):
        tbg.load_published({"model_state_dict": bad_shape}, torch.randn(4, 3))
    missing = {k: v for k, v in ckpt["model_state_dict"].items() if not k.endswith("gcl_0.node_mlp.0.bias")}
    with pytest.raises(CheckpointError, match=r"gcl_0\.node_mlp\.0\.bias"):
        tbg.load_published({"model_state_dict": missing}, torch.randn(4, 3))
    with pytest.raises(ValueError, match="columns"):
        tbg.load_published(ckpt, torch.randn(4, 5))
    with pytest.raises(CheckpointError, match="no EGNN weights"):
        tbg.load_published({"model_state_dict": {"foo.weight": torch.zeros(1)}}, torch.randn(4, 3))


class _Payload:
    def __reduce__(self):  # would run code if unpickled without weights_only
        return (print, ("executed",))


def test_loading_never_executes_code(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {}, "payload": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refuses to load") as refused:
        tbg.load_published(path, torch.randn(4, 3))
    assert "weights_only" not in str(refused.value)  # torch's advice to load it unrestricted is not passed on
