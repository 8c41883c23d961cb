"Model: every family x tower x connector builds, trains a step and round-trips; the batched merge equals a per-sample loop."
import itertools, os, random
import pytest, torch
import transformers
os.environ.setdefault('DS_ACCELERATOR', 'cpu')
transformers.utils.logging.disable_progress_bar()
from tinyllava_nb.data.template import IGNORE_INDEX, IMAGE_TOKEN_INDEX as I
from tinyllava_nb.model.tinyllava import TinyLlavaForConditionalGeneration, merge_image_features, toy_tinyllava

NEW_LLMS = ['qwen3', 'llama3', 'smollm2', 'gemma2', 'gemma3', 'phi3']     # the 2024-25 families' toy versions
FAMILIES = ['llama', 'phi', 'gemma', 'qwen2', 'stablelm'] + NEW_LLMS
COMBOS = [(t, c) for t in ['clip', 'siglip', 'dinov2'] for c in ['identity', 'linear', 'mlp2x_gelu', 'qformer', 'resampler']]
COMBOS += [('mof', 'mof_mlp'), ('siglip', 'mlp3x_relu')]
MATRIX = [(FAMILIES[i % len(FAMILIES)], t, c) for i, (t, c) in enumerate(COMBOS)]   # each family 1-2 times

def batch_for(model, tok, n_images=(1, 0, 2), pad_left=False):
    "A batch with image samples and a text-only one: ids, mask, labels, images."
    rows = []
    for n in n_images:
        ids = [5, 6] + sum(([I, 7] for _ in range(n)), []) + [8, 9, tok.eos_token_id]
        rows.append(ids)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id); mask = torch.zeros_like(ids)
    for r, x in enumerate(rows):
        cols = slice(width - len(x), width) if pad_left else slice(0, len(x))
        ids[r, cols] = torch.tensor(x); mask[r, cols] = 1
    labels = torch.where((mask == 1) & (ids != I), ids, IGNORE_INDEX)
    size = model.config.vision_config.image_size
    return dict(input_ids=ids, attention_mask=mask, labels=labels, images=torch.randn(sum(n_images), 3, size, size))

@pytest.mark.parametrize('llm,tower,connector', MATRIX, ids=['-'.join(m) for m in MATRIX])
def test_build_train_roundtrip(llm, tower, connector, tmp_path):
    model, tok, proc = toy_tinyllava(llm, tower, connector, vision_hidden_size=64 if connector == 'identity' else 32)
    batch = batch_for(model, tok)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(n.startswith('language_model.') for n in trained)
    assert connector == 'identity' or any(n.startswith('connector.') for n in trained)
    assert not any(n.startswith('vision_tower.') for n in trained)            # frozen by default
    model.save_pretrained(tmp_path)
    back = TinyLlavaForConditionalGeneration.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)

def reference_merge(ids, mask, labels, feats, embed, left):
    "Per-sample loop: strip padding, cut at each -200, concatenate, re-pad."
    rows, labs, k = [], [], 0
    for x, m, l in zip(ids, mask.bool(), labels):
        x, l = x[m], l[m]
        e, y = [], []
        for t, lab in zip(x, l):
            if t == I: e.append(feats[k]); y.append(torch.full((len(feats[k]),), IGNORE_INDEX)); k += 1
            else: e.append(embed(t[None])); y.append(lab[None])
        rows.append(torch.cat(e)); labs.append(torch.cat(y))
    width = max(len(r) for r in rows)
    E = torch.zeros(len(rows), width, rows[0].shape[-1]); L = torch.full((len(rows), width), IGNORE_INDEX); M = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (r, y) in enumerate(zip(rows, labs)):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        E[b, cols], L[b, cols], M[b, cols] = r, y, 1
    return E, M, L

@pytest.mark.parametrize('seed', range(20))
def test_merge_equals_per_sample_loop(seed):
    g = random.Random(seed)
    embed = torch.nn.Embedding(50, 8)
    left = seed % 2 == 1
    B = g.randint(1, 5)
    rows = []
    for _ in range(B):
        n_img = g.choice([0, 0, 1, 2])
        toks = [g.randint(1, 49) for _ in range(g.randint(1, 6))]
        for _ in range(n_img): toks.insert(g.randint(0, len(toks)), I)
        rows.append(toks)
    width = max(map(len, rows))
    ids = torch.zeros(B, width, dtype=torch.long); mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        ids[b, cols], mask[b, cols] = torch.tensor(r), 1
    labels = torch.where(mask.bool() & (ids != I), ids, IGNORE_INDEX)
    n = int((ids == I).sum())
    sizes = torch.tensor([g.randint(1, 5) for _ in range(n)], dtype=torch.long)   # like anyres: different per image
    feats = [torch.randn(int(s), 8) for s in sizes]
    flat = torch.cat(feats) if feats else torch.zeros(0, 8)
    E, M, P, L = merge_image_features(ids, mask, labels, flat, sizes, embed)
    E2, M2, L2 = reference_merge(ids, mask, labels, feats, embed, left and bool((mask[:, 0] == 0).any()))
    assert torch.equal(M, M2) and torch.equal(L, L2)
    torch.testing.assert_close(E[M.bool()], E2[M2.bool()])          # padding's vectors are never used
    assert torch.equal(P.expand_as(M)[M.bool()], torch.cat([torch.arange(int(m.sum())) for m in M]))

@pytest.mark.parametrize('llm', FAMILIES)
def test_generation_cache_and_batching(llm):
    model, tok, _ = toy_tinyllava(llm, 'clip', 'mlp2x_gelu', seed=1)
    model.eval()
    single = batch_for(model, tok, n_images=(1,))
    kw = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    a = model.generate(single['input_ids'], images=single['images'], attention_mask=single['attention_mask'], use_cache=True, **kw)
    b = model.generate(single['input_ids'], images=single['images'], attention_mask=single['attention_mask'], use_cache=False, **kw)
    assert torch.equal(a, b)
    both = batch_for(model, tok, n_images=(1, 2), pad_left=True)
    both['images'][:1] = single['images']
    c = model.generate(both['input_ids'], images=both['images'], attention_mask=both['attention_mask'], **kw)
    assert torch.equal(c[:1], a)                                             # left-padded batch == alone

def test_anyres_images():
    model, tok, _ = toy_tinyllava('phi', 'siglip', 'mlp2x_gelu')
    batch = batch_for(model, tok, n_images=(1, 0, 1))
    tiles = [torch.randn(3, 3, 32, 32), torch.randn(5, 3, 32, 32)]          # base + 2 tiles, base + 4 tiles
    out = model(**{**batch, 'images': tiles})
    K = model.num_image_tokens
    width = int((batch['attention_mask'].sum(1) + torch.tensor([3 * K - 1, 0, 5 * K - 1])).max())
    assert out.logits.shape[1] == width

def test_image_count_mismatch_is_clear():
    model, tok, _ = toy_tinyllava()
    batch = batch_for(model, tok)
    with pytest.raises(ValueError, match=r"3 image slots \(-200\) in input_ids but 2 images were given"):
        model(**{**batch, 'images': batch['images'][:2]})
    with pytest.raises(ValueError, match="but no images were given"):
        model(**{**batch, 'images': None})

def test_unknown_parts_are_clear():
    with pytest.raises(KeyError, match="registered: avgpool, identity, linear, mlp, mof_mlp, pixel_shuffle, qformer, resampler"):
        toy_tinyllava(connector='mlp2x_swish')

@pytest.mark.parametrize('llm', FAMILIES)
def test_packed_batch_equals_separate_samples(llm):
    "Packing (one row, restarting positions, no mask): per-sample losses and gradients equal the padded batch's."
    from tinyllava_nb.data.dataset import DataCollatorForSupervisedDataset
    model, tok, _ = toy_tinyllava(llm, 'clip', 'mlp2x_gelu')
    size = model.config.vision_config.image_size
    rng, samples = random.Random(0), []
    for n in (1, 0, 2, 0, 1):                                   # image counts; text lengths vary
        ids = [5] + sum(([I, 7] for _ in range(n)), []) + [rng.randrange(10, 60) for _ in range(rng.randint(2, 40))] + [tok.eos_token_id]
        labels = [IGNORE_INDEX if t == I or i < len(ids) // 2 else t for i, t in enumerate(ids)]
        samples.append(dict(input_ids=torch.tensor(ids), labels=torch.tensor(labels),
                            images=torch.randn(n, 3, size, size) if n else None))
    grads = []
    for packing in (False, True):
        model.zero_grad()
        batch = DataCollatorForSupervisedDataset(tok, packing=packing)(samples)
        loss = model(**batch).loss; loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (lp, gp), (lk, gk) = grads
    torch.testing.assert_close(lk, lp, atol=1e-5, rtol=1e-5)
    for a, b in zip(gp, gk): torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match='first token'):
        DataCollatorForSupervisedDataset(tok, packing=True)([dict(input_ids=torch.tensor([5, 6]), labels=torch.tensor([5, 6]))])


@pytest.mark.parametrize('llm', FAMILIES)
def test_greedy_batch_of_16_equals_one_at_a_time(llm):
    "16 prompts of different lengths and image counts, left padded in one batch: each row generates what it does alone."
    model, tok, _ = toy_tinyllava(llm, 'siglip', 'mlp2x_gelu', seed=2)
    model.eval()
    rng, size = random.Random(0), model.config.vision_config.image_size
    prompts = [[rng.randrange(10, 60) for _ in range(rng.randint(1, 9))] + [I] * (k % 3) + [rng.randrange(10, 60)]
               for k in range(16)]
    images = [torch.randn(p.count(I), 3, size, size) for p in prompts]
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    alone = [model.generate(torch.tensor([p]), images=im if len(im) else None, **kw)[0] for p, im in zip(prompts, images)]
    width = max(map(len, prompts))
    ids = torch.full((16, width), tok.pad_token_id); mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts): ids[r, width - len(p):] = torch.tensor(p); mask[r, width - len(p):] = 1
    batch = model.generate(ids, images=torch.cat(images), attention_mask=mask, **kw)
    for r in range(16): assert torch.equal(batch[r], alone[r]), (llm, r)

@pytest.mark.parametrize('llm', NEW_LLMS)
def test_lora_on_the_llm(llm):
    "LoRA on every linear layer of the new LLMs (fused ones too: Phi-3's qkv_proj): only adapters and the connector train."
    from tinyllava_nb.train.recipe import Recipe, apply_recipe
    model, tok, _ = toy_tinyllava(llm, 'siglip', 'mlp2x_gelu')
    model, _ = apply_recipe(model, Recipe(llm='lora', connector='full', lora_r=4, lora_alpha=8), verbose=False)
    model(**batch_for(model, tok)).loss.backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any('lora_' in n for n in trained) and all('lora_' in n or '.connector.' in n for n in trained)
    assert all(p.grad is not None for n, p in trained.items() if 'lora_B' in n)
