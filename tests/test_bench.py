"The benchmark suite at tiny sizes: every fast path agrees with its reference (no timing assertions)."
import json, subprocess, sys
from pathlib import Path

import pytest
import torch

from tinyllava_nb.bench import Row, bench_merge, limit_greedy, loop_merge, merge_batch, run_bench, train_parts
from tinyllava_nb.model.tinyllava import merge_image_features

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_suite_writes_every_row(tmp_path):
    out = tmp_path / 'results.json'
    rows = run_bench('tiny', out, log=lambda s: None)
    data = json.loads(out.read_text())
    assert [r['name'] for r in data['rows']] == [r.name for r in rows] and len(rows) == 10
    assert all(r.value > 0 and isinstance(r.met, bool) for r in rows)
    assert data['machine']['torch'] == torch.__version__


def test_merge_reference_catches_a_wrong_merge():
    ids, mask, labels, feats, sizes, emb = merge_batch(batch=3, text=20, image_tokens=4, hidden=8, vocab=50)
    e1, m1, _, l1 = merge_image_features(ids, mask, labels, feats, sizes, emb)
    e2, m2, l2 = loop_merge(ids, mask, labels, feats, sizes, emb)
    assert torch.equal(e1[m1.bool()], e2[m2.bool()]) and torch.equal(l1, l2)
    swapped = torch.cat([feats[4:8], feats[:4], feats[8:]])          # images in the wrong slots
    e3, _, _, _ = merge_image_features(ids, mask, labels, swapped, sizes, emb)
    assert not torch.equal(e3[m1.bool()], e2[m2.bool()])


def test_row_direction():
    assert Row('a', 0.9, 0.8).met and not Row('b', 0.7, 0.8).met
    assert Row('c', 0.99, 1.0, higher_is_better=False).met and not Row('d', 1.01, 1.0, higher_is_better=False).met


def test_rows_within_their_noise_read_equal():
    same = Row('memory', 1.0009, 1.0, False, equal=1e-3)
    assert same.met and same.is_equal and 'equal' in str(same)
    assert not Row('memory', 1.0011, 1.0, False, equal=1e-3).met and not Row('x', 1.0001, 1.0, False).is_equal


def test_merge_reference_keeps_padding_and_several_images_per_sample():
    ids, mask, labels, feats, sizes, emb = merge_batch(batch=3, text=20, image_tokens=4, hidden=8, vocab=50)
    ids[1, 2] = -200; ids[2, 0] = -200                                      # a second image in two samples
    feats = torch.randn(int((ids == -200).sum()) * 4, 8)
    sizes = torch.full((len(feats) // 4,), 4)
    e1, m1, _, l1 = merge_image_features(ids, mask, labels, feats, sizes, emb)
    e2, m2, l2 = loop_merge(ids, mask, labels, feats, sizes, emb)
    assert torch.equal(m1, m2) and torch.equal(l1, l2) and torch.equal(e1[m1.bool()], e2[m2.bool()])
    assert (e2[~m2.bool()] == 0).all()                                       # LLaVA pads with zeros


def test_generate_limit_is_the_model_s_greedy_answer():
    model, tok, b = train_parts(batch=1)
    model.eval()
    expected = model.generate(b['input_ids'], images=b['images'], max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(limit_greedy(model, b, 6), expected)


def test_cli_and_module_entry_points(tmp_path):
    for cmd in (['tinyllava-nb', 'bench', '--size', 'tiny', '--output', str(tmp_path / 'a.json')],
                [sys.executable, '-m', 'bench', '--size', 'tiny', '--output', str(tmp_path / 'b.json')]):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert 'targets met' in r.stdout and 'merge: loop / ours' in r.stdout
    assert json.loads((tmp_path / 'b.json').read_text())['size'] == 'tiny'
