"Block-merging connectors (pixel shuffle, average pooling) and grids: order, pooling, padding, errors, in a model."
import os
from types import SimpleNamespace
import pytest, torch
import torch.nn.functional as F
import transformers
os.environ.setdefault('DS_ACCELERATOR', 'cpu')
transformers.utils.logging.disable_progress_bar()
from tinyllava_nb.data.template import IGNORE_INDEX, IMAGE_TOKEN_INDEX as I
from tinyllava_nb.model.connector import (block_mean, build_connector, connector_name, connectors, pad_grid,
                                          pixel_shuffle)
from tinyllava_nb.model.tinyllava import TinyLlavaForConditionalGeneration, toy_tinyllava

def cfg(t, v=8, h=16):
    return SimpleNamespace(connector_type=t, vision_hidden_size=v, hidden_size=h, num_queries=3,
                           num_resampler_layers=1)

def naive_pixel_shuffle(grid, r):
    "Output token (i, j) = patches (r*i + a, r*j + b) concatenated, (a, b) row-major; zeros beyond the grid."
    h, w, d = grid.shape
    patch = lambda y, x: grid[y, x] if y < h and x < w else torch.zeros(d)
    return torch.stack([torch.stack([torch.cat([patch(r * i + a, r * j + b) for a in range(r) for b in range(r)])
                                     for j in range(-(-w // r))]) for i in range(-(-h // r))])

def naive_block_mean(grid, r):
    "Mean of the real patches of each r x r block."
    h, w, _ = grid.shape
    return torch.stack([torch.stack([grid[r * i:r * i + r, r * j:r * j + r].mean((0, 1)) for j in range(-(-w // r))])
                        for i in range(-(-h // r))])

chw = lambda x: x.permute(0, 3, 1, 2)                                 # [n, h, w, D] -> [n, D, h, w], torch's layout

@pytest.fixture(autouse=True)
def seed(): torch.manual_seed(0)

@pytest.mark.parametrize('h,w,r', [(4, 4, 2), (6, 12, 3), (8, 8, 4), (5, 7, 2), (3, 3, 1), (1, 1, 3), (7, 2, 3)])
def test_order_and_mean_against_loops(h, w, r):
    x = torch.randn(2, h, w, 5)
    assert torch.equal(pixel_shuffle(x, r), torch.stack([naive_pixel_shuffle(g, r) for g in x]))
    torch.testing.assert_close(block_mean(x, r), torch.stack([naive_block_mean(g, r) for g in x]))
    torch.testing.assert_close(chw(block_mean(x, r)), F.avg_pool2d(chw(x), r, ceil_mode=True))   # torch's avg pool

def test_order_is_idefics3s():
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
    for g, r in [(8, 2), (9, 3), (8, 4)]:
        x = torch.randn(2, g, g, 6)
        assert torch.equal(pixel_shuffle(x, r).flatten(1, 2), Idefics3Connector.pixel_shuffle(None, x.flatten(1, 2), r))

def test_padding_of_odd_grids():
    x = torch.randn(1, 3, 5, 2)
    padded = pad_grid(x, 2)                                                # zeros below and to the right
    assert padded.shape == (1, 4, 6, 2) and torch.equal(padded[:, :3, :5], x)
    assert not padded[:, 3].any() and not padded[:, :, 5].any()
    ps = pixel_shuffle(x, 2)                                               # [1, 2, 3, 8]
    assert ps.shape == (1, 2, 3, 8)
    assert torch.equal(ps[0, 1, 2], torch.cat([x[0, 2, 4], torch.zeros(6)]))        # 1 real patch, 3 zero pads
    assert torch.equal(ps[0, 0, 2], torch.cat([x[0, 0, 4], torch.zeros(2), x[0, 1, 4], torch.zeros(2)]))
    torch.testing.assert_close(block_mean(x, 2)[0, 1, 2], x[0, 2, 4])               # the mean of the real ones
    torch.testing.assert_close(block_mean(x, 2)[0, 0, 2], x[0, :2, 4].mean(0))

@pytest.mark.parametrize('family', ['pixel_shuffle', 'avgpool'])
@pytest.mark.parametrize('r', [1, 2, 3, 4])
def test_shapes_and_counts(family, r):
    conn = build_connector(cfg(f'{family}{r}x_mlp'))
    g = 12
    out = conn(torch.randn(3, g * g, 8))
    assert out.shape == (3, (g // r) ** 2, 16) == (3, conn.num_tokens(g * g), 16)
    assert conn._connector[0].in_features == (8 * r * r if family == 'pixel_shuffle' else 8)
    assert [type(m) for m in conn._connector] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
    assert conn.grid_tokens(5, 7) == -(-5 // r) * -(-7 // r)
    assert connector_name(f'{family}{r}x_mlp') == family

def test_forward_is_merge_then_mlp():
    ps, ap = build_connector(cfg('pixel_shuffle2x_mlp')), build_connector(cfg('avgpool2x_mlp'))
    x = torch.randn(2, 36, 8)
    grids = x.unflatten(1, (6, 6))                                         # row-major: token k is patch (k // 6, k % 6)
    with torch.no_grad():
        assert torch.equal(ps(x), ps._connector(torch.stack([naive_pixel_shuffle(g, 2) for g in grids]).flatten(1, 2)))
        pooled = F.avg_pool2d(chw(grids), 2).permute(0, 2, 3, 1)
        torch.testing.assert_close(ap(x), ap._connector(pooled.flatten(1, 2)))

@pytest.mark.parametrize('t', ['pixel_shuffle2x_mlp', 'avgpool3x_mlp', 'identity', 'linear', 'mlp2x_gelu', 'resampler',
                               'qformer'])
def test_list_of_grids_equals_per_grid_calls(t):
    conn = build_connector(cfg(t, v=16 if t == 'identity' else 8)).eval()
    d = 16 if t == 'identity' else 8
    grids = [torch.randn(*s, d) for s in [(5, 7), (4, 4), (5, 7), (1, 9), (4, 4)]]   # two shapes twice, in between
    with torch.no_grad():
        outs = conn(grids)
        assert isinstance(outs, list) and len(outs) == len(grids)
        for g, o in zip(grids, outs):
            assert o.shape == (conn.grid_tokens(*g.shape[:2]), 16)
            torch.testing.assert_close(o, conn([g])[0], atol=1e-5, rtol=1e-5)
            if 'x_mlp' not in t:                                       # per-token and query maps: the grid flattened
                torch.testing.assert_close(o, conn(g.flatten(0, 1)[None])[0], atol=1e-5, rtol=1e-5)
    assert conn([]) == []

def test_list_gradients_flow():
    conn = build_connector(cfg('pixel_shuffle2x_mlp'))
    sum(o.sum() for o in conn([torch.randn(3, 5, 8), torch.randn(2, 2, 8)])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in conn.parameters())

def test_errors():
    ps = build_connector(cfg('pixel_shuffle2x_mlp'))
    with pytest.raises(ValueError, match="square patch grid, got 15: .*'cls_patch' with SigLIP"): ps.num_tokens(15)
    with pytest.raises(ValueError, match="square patch grid, got 577"): ps(torch.randn(1, 577, 8))
    with pytest.raises(ValueError, match=r"the 27x27 patch grid does not split into 2x2 blocks; use a block size that "
                                         r"divides 27 \(1, 3, 9, 27\) or images of 28 patches a side"):
        ps.num_tokens(729)
    with pytest.raises(ValueError, match="the 6x6 patch grid does not split into 4x4"):
        build_connector(cfg('avgpool4x_mlp'))(torch.randn(1, 36, 8))
    for name in ('pixel_shuffle', 'avgpool'):
        with pytest.raises(ValueError, match=f"needs its block size r, e.g. '{name}2x_mlp'"): connector_name(name)
    with pytest.raises(ValueError, match="needs a block size r >= 1"): build_connector(cfg('pixel_shuffle0x_mlp'))
    with pytest.raises(KeyError, match="unknown connector 'pixel_shuffle2x_gelu'"):
        build_connector(cfg('pixel_shuffle2x_gelu'))
    assert {'pixel_shuffle', 'avgpool'} <= set(connectors.names())

def batch_for(tok, size, n_images=(1, 0, 2)):
    "Right-padded rows with image slots, their labels, and random images."
    rows = [[5, 6] + sum(([I, 7] for _ in range(n)), []) + [8, 9, tok.eos_token_id] for n in n_images]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id); mask = torch.zeros_like(ids)
    for r, x in enumerate(rows): ids[r, :len(x)] = torch.tensor(x); mask[r, :len(x)] = 1
    labels = torch.where((mask == 1) & (ids != I), ids, IGNORE_INDEX)
    return dict(input_ids=ids, attention_mask=mask, labels=labels, images=torch.randn(sum(n_images), 3, size, size))

ROUNDTRIPS = [('phi', 'siglip', 'pixel_shuffle2x_mlp', 'cls_patch'), ('llama', 'clip', 'avgpool2x_mlp', 'patch')]

@pytest.mark.parametrize('llm,tower,connector,strategy', ROUNDTRIPS)
def test_build_train_roundtrip(llm, tower, connector, strategy, tmp_path):
    model, tok, _ = toy_tinyllava(llm, tower, connector, vision_feature_select_strategy=strategy)
    assert model.num_image_tokens == 4                                      # 32 px / 8 px = 4x4 patches -> 2x2 tokens
    feats, sizes = model.encode_images(torch.randn(3, 3, 32, 32))
    assert feats.shape == (12, 64) and sizes.tolist() == [4, 4, 4]
    batch = batch_for(tok, model.config.vision_config.image_size)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(n.startswith('connector._connector.') for n in trained)
    assert not any(n.startswith('vision_tower.') for n in trained)
    model.save_pretrained(tmp_path)
    back = TinyLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert back.config.connector_type == connector and type(back.connector) is type(model.connector)
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)

def test_siglip_patch_strategy_is_a_clear_error():
    "SigLIP has no CLS: TinyLLaVA's default 'patch' drops a patch, 15 of 16 are no square."
    model, tok, _ = toy_tinyllava('phi', 'siglip', 'pixel_shuffle2x_mlp')
    with pytest.raises(ValueError, match="got 15: a CLS token kept"): model.num_image_tokens
    with pytest.raises(ValueError, match="'cls_patch' with SigLIP"): model(**batch_for(tok, 32))
