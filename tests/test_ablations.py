"""The ablation table's pieces (mar.eval.ablations, evaluate.py ablations): the rows cover Table 1's eight cells,
MaskGIT and Table 2; the spread formula; the table's layout; refusals. The end-to-end run is the command
itself (README); every cell's training and sampling is tested in test_cells.py."""
import json
import statistics

import pytest

from mar.config.loader import ConfigError, load_config
from mar.config.schema import TrainConfig
from mar.eval import ablations
from mar.eval.ablations import CONFIGS, ROWS, Budget, Row, ensure_trained, seed_spread, write_table

import evaluate


def test_rows_are_the_papers_cells_and_their_configs_say_so():
    table1 = {(r.variant, r.order, r.attention, r.per_step != "1", r.loss.split()[0]) for r in ROWS[:8]}
    assert len(table1) == 8  # raster/random x causal/bidirectional x 1/>1 per step x CrossEnt/Diff, as in Table 1
    for r in ROWS:
        cfg = load_config(TrainConfig, CONFIGS / f"{r.cell}.yaml")
        assert (cfg.model.head == "categorical") == r.loss.startswith("CrossEnt")
        assert (cfg.model.arch == "causal") == (r.attention == "causal")
        if cfg.model.arch == "causal":
            assert cfg.model.order == r.order and r.num_iter is None
        assert cfg.tokenizer.continuous == (r.cell == "vq_diff")
    assert {r.paper for r in ROWS if r.cell == "vq_diff"} == {(7.82, 3.64)}  # Table 2, VQ-16 with Diffusion Loss


def test_seed_spread_is_mean_and_sample_std():
    per = [{"fd_fmnist": 10.0, "class_accuracy": 0.5, "is_fmnist_mean": 3.0},
           {"fd_fmnist": 14.0, "class_accuracy": 0.7, "is_fmnist_mean": 3.0}]
    s = seed_spread(per)
    assert s["fd_fmnist"]["mean"] == 12.0 and s["fd_fmnist"]["std"] == pytest.approx(statistics.stdev([10, 14]))
    assert s["fd_fmnist"]["std"] == pytest.approx(2 ** 0.5 * 2)
    with pytest.raises(ValueError, match="two seeds"):
        seed_spread(per[:1])


def test_table_layout(tmp_path):
    budget = Budget(steps=10, batch=4, num_images=6, cfg=2.0)
    rows = []
    for i, r in enumerate(ROWS[:2]):
        score = {"fd_fmnist": 100.0 + i, "class_accuracy": 0.25, "is_fmnist_mean": 2.0, "seconds_per_image": 0.1}
        rows.append({**r.__dict__, "paper": list(r.paper), "parameters": 1_500_000, "train_seconds": 90.0,
                     "scores": {"1": score, "2": {**score, "fd_fmnist": 50.0 + i}}})
    text = write_table(rows, {}, {"ar_raster_ce": {"cached_s_per_image": 0.1, "uncached_s_per_image": 0.5,
                                                   "speedup": 5.0, "tokens_agree": True}}, tmp_path, budget, 60.0)
    lines = [line for line in text.splitlines() if line.startswith("| AR")]
    assert lines[0].split(" | ")[5:9] == ["19.58", "4.92", "100", "50"]
    assert "| 1.50 M | 1.5 min |" in lines[0] and "25.0%" in lines[0]
    assert "| ar_raster_ce | 0.100 | 0.500 | 5.00x | yes, bit for bit |" in text
    data = json.loads((tmp_path / "table.json").read_text())
    assert data["budget"]["steps"] == 10 and len(data["rows"]) == 2
    assert (tmp_path / "plot_fd_fmnist.png").stat().st_size > 1000 and (tmp_path / "table.csv").exists()


def test_a_changed_budget_is_refused(tmp_path):
    (tmp_path / "mar_ce").mkdir()
    (tmp_path / "mar_ce" / "train.json").write_text(json.dumps({"budget": {"steps": 5, "batch": 64, "seed": 0},
                                                                 "seconds": 1.0}))
    with pytest.raises(ValueError, match="was trained with"):
        ensure_trained(tmp_path, "mar_ce", 0, {}, {}, Budget(steps=300))


@pytest.mark.parametrize("args,message", [
    (["--rows", "nope"], "unknown rows"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--cfg", "1"], "cfg must be"),
    (["--spread-seeds", "0"], "spread seeds"),
])
def test_cli_refuses_bad_settings_in_one_line(tmp_path, capsys, args, message):
    assert evaluate.main(["ablations", "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("overrides,message", [
    (["model.head=categorical"], "needs discrete tokens but tokenizer 'kl_f4_c8' gives continuous"),
    (["model.head=diffloss", "tokenizer.preset=vq_f4_c8_k512"], "needs continuous tokens"),
    (["model.kv_cache=true"], "a KV cache needs causal attention"),
    (["model.arch=mar", "model.order=raster"], "order must be 'random'"),
])
def test_parts_that_do_not_fit_are_refused_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, CONFIGS / "mar_diff.yaml", overrides)


def test_a_kv_cache_on_a_causal_cell_loads():
    cfg = load_config(TrainConfig, CONFIGS / "ar_raster_ce.yaml", ["model.kv_cache=true"])
    assert cfg.model.kv_cache is True and cfg.model.arch == "causal"
