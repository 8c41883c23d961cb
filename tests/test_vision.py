"Vision towers: SigLIP2 NaFlex grids (shapes, batch independence, layers), resolution by config, the 'auto' tower."
import json, os
import pytest, torch, transformers
from PIL import Image
os.environ.setdefault('DS_ACCELERATOR', 'cpu')
transformers.utils.logging.disable_progress_bar()
from tinyllava_nb.data.template import IGNORE_INDEX, IMAGE_TOKEN_INDEX as I
from tinyllava_nb.model.tinyllava import load_pretrained, save_pretrained_all, toy_tinyllava
from tinyllava_nb.model.vision import naflex_grids, pad_grids, vision_config_of, vision_tower_name, vision_towers
from tinyllava_nb.toy import toy_image_processor, toy_vision_config

PICTURES = [(64, 24), (32, 32), (24, 40)]                    # wide, square, tall: 2x6, 4x4, 5x3 grids of 8-px patches

def naflex_tower(**kw):
    torch.manual_seed(0)
    tower = vision_towers['siglip2'](toy_vision_config('siglip2', **kw))
    tower.image_processor = toy_image_processor('siglip2', 32)
    return tower

def grids_of(sizes, proc=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for w, h in sizes]
    return naflex_grids(proc or toy_image_processor('siglip2', 32), images)

def test_naflex_grids_and_tower_shapes():
    tower, grids = naflex_tower(), grids_of(PICTURES)
    assert [tuple(g.shape) for g in grids] == [(2, 6, 192), (4, 4, 192), (5, 3, 192)]
    feats = tower(grids)
    assert [tuple(f.shape) for f in feats] == [(2, 6, 32), (4, 4, 32), (5, 3, 32)]
    assert tower.num_tokens() == 16 and [tower.num_tokens(grid=g) for g in grids] == [12, 16, 15]
    pixels, mask, shapes = pad_grids(grids)
    assert pixels.shape == (3, 16, 192) and mask.sum(1).tolist() == [12, 16, 15]
    assert shapes.tolist() == [[2, 6], [4, 4], [5, 3]]
    with pytest.raises(ValueError, match=r"takes a list of patch grids \[h, w, 192\].*naflex_grids"):
        tower(torch.zeros(2, 3, 32, 32))

def test_naflex_features_do_not_depend_on_the_batch():
    tower, grids = naflex_tower(), grids_of(PICTURES)
    batched = tower(grids)
    for i, g in enumerate(grids):
        torch.testing.assert_close(tower([g])[0], batched[i], atol=1e-5, rtol=0)
    alone, beside_larger = tower(grids[:1])[0], tower(grids[:2])[0]
    torch.testing.assert_close(beside_larger, alone, atol=1e-5, rtol=0)

def test_naflex_layer_choice():
    tower, grids = naflex_tower(num_hidden_layers=3), grids_of(PICTURES[:1])
    hidden = tower._vision_tower(*pad_grids(grids), output_hidden_states=True).hidden_states
    assert len(hidden) == 4                                   # embeddings + 3 layers
    for layer in (-1, -2, -3, 0):
        torch.testing.assert_close(tower(grids, layer)[0].flatten(0, 1), hidden[layer][0], atol=1e-6, rtol=0)
    assert not torch.allclose(tower(grids, -1)[0], tower(grids, -2)[0])
    assert torch.equal(tower(grids, -2, 'patch')[0], tower(grids, -2, 'cls_patch')[0])     # no CLS: both keep all
    with pytest.raises(ValueError, match="must be one of"):
        tower(grids, -2, 'cls')

def test_naflex_processor_for():
    proc = vision_towers['siglip2'].processor_for(transformers.Siglip2VisionConfig(patch_size=16))
    assert (proc.patch_size, proc.max_num_patches, int(proc.resample), list(proc.image_mean)) == (16, 256, 2, [0.5] * 3)
    assert [tuple(g.shape[:2]) for g in grids_of([(1920, 1080), (64, 24)], proc)] == [(12, 21), (10, 25)]

FIXED_SIGLIP2 = {'initializer_factor': 1.0, 'model_type': 'siglip',            # google/siglip2-base-patch16-512
                 'text_config': {'model_type': 'siglip_text_model', 'vocab_size': 256000},
                 'vision_config': {'image_size': 512, 'model_type': 'siglip_vision_model'}}

def test_tower_resolution(tmp_path):
    (tmp_path / 'fixed').mkdir()
    (tmp_path / 'fixed' / 'config.json').write_text(json.dumps(FIXED_SIGLIP2))
    assert vision_tower_name(str(tmp_path / 'fixed')) == 'siglip'
    vcfg = toy_vision_config('siglip2')
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                pad_token_id=1, bos_token_id=2, eos_token_id=3)
    full = transformers.Siglip2Model(transformers.Siglip2Config(text_config=text, vision_config=vcfg.to_dict()))
    full.save_pretrained(tmp_path / 'naflex')
    toy_image_processor('siglip2').save_pretrained(tmp_path / 'naflex')
    assert json.loads((tmp_path / 'naflex' / 'config.json').read_text())['model_type'] == 'siglip2'
    assert vision_tower_name(str(tmp_path / 'naflex')) == 'siglip2'                # full NaFlex checkpoint
    assert vision_tower_name('x', vcfg) == vision_tower_name('x', full.config) == 'siglip2'   # vision-only, full config
    tower = vision_towers['siglip2'](vision_config_of(str(tmp_path / 'naflex'))).load(str(tmp_path / 'naflex'))
    grids = grids_of(PICTURES[:1])
    want = full.vision_model(*pad_grids(grids), output_hidden_states=True).hidden_states[-2][0]
    torch.testing.assert_close(tower(grids)[0].flatten(0, 1), want, atol=1e-6, rtol=0)
    assert vision_tower_name('x', transformers.ViTConfig()) == 'auto'               # unknown to us, known to AutoModel
    class EvaConfig(transformers.PretrainedConfig): model_type = 'eva'
    with pytest.raises(ValueError, match="no vision tower for model_type 'eva'.*registered towers: auto, clip"):
        vision_tower_name('x', EvaConfig())

VIT = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64)
CNN = transformers.ConvNextV2Config(image_size=32, patch_size=4, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)   # no tutorial registers it

def test_auto_tower_vit():
    assert vision_tower_name('x', VIT) == 'auto'
    tower, px = vision_towers['auto'](VIT), torch.randn(2, 3, 32, 32)
    hidden = tower._vision_tower(px, output_hidden_states=True).hidden_states
    assert torch.equal(tower(px), hidden[-2][:, 1:])                            # CLS dropped by 'patch'
    assert torch.equal(tower(px, -1, 'cls_patch'), hidden[-1])
    assert [tower.num_tokens(s) for s in ('patch', 'cls_patch')] == [16, 17]
    assert (tower.has_cls, tower.hidden_size) == (True, 32)
    proc = tower.processor_for(VIT)
    assert proc(Image.new('RGB', (50, 20)), return_tensors='pt')['pixel_values'].shape == (1, 3, 32, 32)
    assert not any(p.requires_grad for p in tower.parameters())

def test_auto_tower_cnn():
    assert vision_tower_name('x', CNN) == 'auto'
    tower, px = vision_towers['auto'](CNN), torch.randn(2, 3, 32, 32)
    fmap = tower._vision_tower(px).last_hidden_state                            # [2, 32, 4, 4]
    assert torch.equal(tower(px, -1), fmap.flatten(2).transpose(1, 2))
    assert torch.equal(tower(px, -1, 'patch'), tower(px, -1, 'cls_patch'))     # no CLS to drop
    assert (tower.num_tokens(), tower.has_cls, tower.hidden_size) == (16, False, 32)
    with pytest.raises(ValueError, match="is 16 wide.*use vision_feature_layer -1"):
        tower(px, -2)

def test_auto_tower_in_a_tinyllava():
    from tinyllava_nb.model.tinyllava import TinyLlavaConfig, TinyLlavaForConditionalGeneration
    from tinyllava_nb.toy import toy_llm_config
    for vcfg, layer in [(VIT, -2), (CNN, -1)]:
        model = TinyLlavaForConditionalGeneration(TinyLlavaConfig(text_config=toy_llm_config('phi'), vision_config=vcfg,
                                                                  vision_feature_layer=layer))
        assert model.config.vision_tower_type == 'auto' and model.num_image_tokens == 16
        feats, sizes = model.encode_images(torch.randn(2, 3, 32, 32))
        assert feats.shape == (32, 64) and sizes.tolist() == [16, 16]

def naflex_batch(tok, n_rows, pad_left=False, answer=True):
    "Rows of text around one image slot each, padded to one width: ids, mask, labels."
    rows = [[5, 6, I, 7, 8] + ([9, 10, tok.eos_token_id] if answer else []) for _ in range(n_rows)]
    ids = torch.tensor(rows)
    labels = torch.where(ids == I, IGNORE_INDEX, ids)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)

@pytest.mark.parametrize('connector', ['mlp2x_gelu', 'pixel_shuffle2x_mlp', 'avgpool2x_mlp'])
def test_toy_tinyllava_siglip2_trains_and_round_trips(connector, tmp_path):
    model, tok, proc = toy_tinyllava('phi', 'siglip2', connector)
    assert type(model.vision_tower).__name__ == 'Siglip2VisionTower' and model.vision_tower.naflex
    grids = naflex_grids(proc, [Image.new('RGB', (64, 24), 'red'), Image.new('RGB', (32, 32), 'blue')])
    batch = {**naflex_batch(tok, 2), 'images': grids}
    out = model(**batch)
    feats, sizes = model.encode_images(grids)
    assert sizes.tolist() == [model.connector.grid_tokens(*g.shape[:2]) for g in grids]
    assert out.logits.shape[1] == batch['input_ids'].shape[1] - 1 + int(sizes.max())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None for p in model.connector.parameters())
    assert all(p.grad is None for p in model.vision_tower.parameters())         # frozen
    model.eval()
    save_pretrained_all(model, tok, proc, tmp_path)
    back, _, back_proc = load_pretrained(tmp_path)
    back_grids = naflex_grids(back_proc, [Image.new('RGB', (64, 24), 'red'), Image.new('RGB', (32, 32), 'blue')])
    assert all(torch.equal(a, b) for a, b in zip(back_grids, grids))
    with torch.no_grad():
        again = back(**{**batch, 'images': back_grids}).logits
        torch.testing.assert_close(again, model(**batch).logits, atol=1e-6, rtol=0)

def left_padded(tok, rows):
    "Prompts (lists of ids) left padded to one width: ids, mask."
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])

def generate_batch_and_alone(connector, rows):
    "Greedy tokens of two prompts with pictures of different shapes (12 and 15 patches): batched, then each alone."
    model, tok, proc = toy_tinyllava('phi', 'siglip2', connector, seed=1)
    model.eval()
    grids, kw = grids_of([(64, 24), (24, 40)], proc), dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    run = lambda rows, images: model.generate(left_padded(tok, rows)[0], images=images,
                                              attention_mask=left_padded(tok, rows)[1], **kw)
    return run(rows, grids), torch.cat([run([r], grids[i:i + 1]) for i, r in enumerate(rows)])

@pytest.mark.parametrize('connector', ['mlp2x_gelu', 'pixel_shuffle2x_mlp', 'avgpool2x_mlp'])
def test_generate_two_shapes_in_one_batch_equals_each_alone(connector):
    both, alone = generate_batch_and_alone(connector, [[5, 6, I, 7, 8], [6, I, 7, 8]])   # the second left padded
    assert torch.equal(both, alone)

def test_generate_two_shapes_equal_length_prompts():
    "Prompts of one length have no padding; pictures of different token counts still end each merged row together."
    both, alone = generate_batch_and_alone('mlp2x_gelu', [[5, 6, I, 7, 8], [5, 9, I, 7, 8]])
    assert torch.equal(both, alone)

def test_num_image_tokens_bounds_every_naflex_grid():
    "Lengths and truncation count an image as `num_image_tokens`: with NaFlex it must bound every grid in the budget."
    model, _, _ = toy_tinyllava('phi', 'siglip2', 'pixel_shuffle2x_mlp')          # 16 patches, 2 x 2 blocks
    grids = [(h, w) for h in range(1, 17) for w in range(1, 17) if h * w <= 16]
    assert model.num_image_tokens == max(model.connector.grid_tokens(h, w) for h, w in grids) == 8   # a 1 x 16 strip

def test_a_full_config_as_data_gives_its_vision_tower():
    "A whole SigLIP2 config (text and vision) stored as `vision_config`: the model takes its vision part."
    from tinyllava_nb.model.tinyllava import TinyLlavaConfig
    from tinyllava_nb.toy import toy_llm_config
    full = transformers.Siglip2Config(vision_config=toy_vision_config('siglip2').to_dict()).to_dict()
    cfg = TinyLlavaConfig(text_config=toy_llm_config('phi'), vision_config=full)
    assert (type(cfg.vision_config).__name__, cfg.vision_hidden_size, cfg.vision_tower_type) == ('Siglip2VisionConfig', 32, 'siglip2')


@pytest.mark.parametrize('connector', ['pixel_shuffle2x_mlp', 'avgpool2x_mlp'])
def test_naflex_packing_equals_padding(connector):
    "Pictures of 2 x 6, 4 x 4 and 1 x 16 patches (3, 4 and 8 tokens): one packed row trains like the padded batch."
    from tinyllava_nb.data.dataset import DataCollatorForSupervisedDataset
    model, tok, proc = toy_tinyllava('qwen3', 'siglip2', connector)
    grids = grids_of([(64, 24), (32, 32), (128, 8)], proc)
    samples = [dict(input_ids=torch.tensor(ids), labels=torch.tensor([IGNORE_INDEX] * 3 + ids[3:]), images=[g])
               for ids, g in zip([[5, I, 6, 7, 8, 9], [5, I, 6, 10, 11, 12, 13], [5, 6, I, 14, 15]], grids)]
    losses = []
    for packing in (False, True):
        batch = DataCollatorForSupervisedDataset(tok, packing=packing)(samples)
        losses.append(model(**batch).loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)

def test_auto_tower_only_for_image_models_and_any_image_size():
    "An LLM's config given as the vision tower is refused by name; Hiera's (height, width) image_size works."
    llama = transformers.LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=8)
    with pytest.raises(ValueError, match="model_type 'llama' .* not an image model"):
        vision_tower_name('an-llm', llama)
    hiera = transformers.HieraConfig(embed_dim=8, num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1])
    assert vision_tower_name('hiera', hiera) == 'auto' and vision_towers['auto'](hiera).num_tokens() == 49
