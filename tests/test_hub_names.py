"""Real 2025-26 small-VLM parts, offline: their published configs pick the right LLM family, vision tower and default
chat template, a Qwen3 + SigLIP2-NaFlex TinyLLaVA config builds (and has the published sizes), and the SmolVLM-like
recipes pass the training checks. The configs in tests/data/hub_configs are copies of the published files (sources in
tests/data/hub_configs/SOURCES.md)."""
import json, os, re, shutil
from pathlib import Path
import pytest, torch
import transformers
os.environ.setdefault('DS_ACCELERATOR', 'cpu')
transformers.utils.logging.disable_progress_bar()
from tokenizers import Tokenizer, models
from tinyllava_nb.data.template import templates
from tinyllava_nb.model.llm import llm_family, llms
from tinyllava_nb.model.tinyllava import TinyLlavaConfig, TinyLlavaForConditionalGeneration
from tinyllava_nb.model.vision import vision_tower_name
from tinyllava_nb.train.run import check_args, parse_args

ROOT = Path(__file__).resolve().parents[1]
HUB = ROOT / 'tests' / 'data' / 'hub_configs'

def hub(name: str) -> dict:
    "The stored config.json of hub model `name` ('org/model')."
    return json.loads((HUB / f"{name.replace('/', '--')}.json").read_text())

def model_dir(tmp_path, name: str) -> str:
    "A model directory holding only the published config.json of `name`, as a hub download would."
    d = tmp_path / name.replace('/', '--'); d.mkdir()
    shutil.copy(HUB / f"{name.replace('/', '--')}.json", d / 'config.json')
    return str(d)

LLMS = [('Qwen/Qwen3-0.6B', 'qwen3', 'qwen3'),                     # (hub name, published model_type, family)
        ('meta-llama/Meta-Llama-3.1-8B', 'llama', 'llama'),
        ('google/gemma-2-9b-it', 'gemma2', 'gemma2')]

@pytest.mark.parametrize('name,model_type,family', LLMS, ids=[n for n, *_ in LLMS])
def test_llm_family_from_published_config(name, model_type, family, tmp_path):
    assert hub(name)['model_type'] == model_type
    assert llm_family(model_dir(tmp_path, name)).name == family

TOWERS = [('google/siglip-so400m-patch14-384', 'siglip'),          # SigLIP
          ('google/siglip2-base-patch16-512', 'siglip')]           # SigLIP2 at a fixed resolution: SigLIP's classes

@pytest.mark.parametrize('name,tower', TOWERS, ids=[n for n, _ in TOWERS])
def test_vision_tower_from_published_config(name, tower, tmp_path):
    assert hub(name)['model_type'] == 'siglip'
    assert vision_tower_name(model_dir(tmp_path, name)) == tower

def naflex_so400m() -> transformers.Siglip2VisionConfig:
    "SigLIP2 so400m NaFlex's vision config: the published so400m widths and depth, NaFlex's 16-pixel patches."
    v = hub('google/siglip-so400m-patch14-384')['vision_config']
    keep = ('hidden_size', 'intermediate_size', 'num_attention_heads', 'num_hidden_layers')
    return transformers.Siglip2VisionConfig(**{k: v[k] for k in keep}, patch_size=16, num_patches=256)

def test_naflex_checkpoint_is_the_siglip2_tower(tmp_path):
    "A checkpoint of model_type 'siglip2' (how NaFlex checkpoints are published) is the 'siglip2' tower."
    transformers.Siglip2Config(vision_config=naflex_so400m().to_dict()).save_pretrained(tmp_path)
    assert json.loads((tmp_path / 'config.json').read_text())['model_type'] == 'siglip2'
    assert vision_tower_name(str(tmp_path)) == 'siglip2'

@pytest.fixture(scope='module')
def smol_config():
    return TinyLlavaConfig(text_config=hub('Qwen/Qwen3-0.6B'), vision_config=naflex_so400m().to_dict(),
                           connector_type='pixel_shuffle2x_mlp')

def test_qwen3_naflex_config_builds_offline(smol_config):
    c = smol_config
    assert (c.text_config.model_type, c.vision_config.model_type) == ('qwen3', 'siglip2_vision_model')
    assert (c.hidden_size, c.vision_hidden_size, c.vocab_size) == (1024, 1152, 151936)
    assert c.vision_tower_type == 'siglip2' and llm_family(c.text_config).name == 'qwen3'

def test_published_sizes_on_meta(smol_config):
    "Qwen3-0.6B: 0.6B parameters, 0.44B without the (tied) embeddings; SigLIP2 so400m's tower: 0.4B; a small connector."
    with torch.device('meta'): model = TinyLlavaForConditionalGeneration(smol_config)
    count = lambda m: sum(p.numel() for p in m.parameters())
    llm, tower, conn = count(model.language_model), count(model.vision_tower), count(model.connector)
    embed = model.language_model.get_input_embeddings().weight
    assert model.language_model.get_output_embeddings().weight is embed      # tie_word_embeddings: true
    assert 0.55e9 < llm < 0.65e9 and 0.43e9 < llm - embed.numel() < 0.45e9, (llm, embed.numel())
    assert 0.38e9 < tower < 0.45e9, tower
    assert conn < 0.02e9, conn

def tokenizer_like(name: str):
    "A word-level tokenizer whose vocabulary is the special tokens of `name`'s published tokenizer_config.json."
    cfg = json.loads((HUB / f"{name.replace('/', '--')}.tokenizer_config.json").read_text())
    marks = re.findall(r"<\|[^|\s]+\|>|</?[a-z_]+>", cfg['chat_template'])         # <|im_start|>, <start_of_turn>, </s>
    special = {k: cfg[k] for k in ('bos_token', 'eos_token', 'pad_token', 'unk_token') if cfg.get(k)}
    vocab = {t: i for i, t in enumerate(dict.fromkeys(['<unk>', *special.values(), *marks]))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, **special)

CHATS = [('meta-llama/Llama-3.2-3B-Instruct', 'llama', 'llama3'),  # (hub name, family, default template)
         ('TinyLlama/TinyLlama-1.1B-Chat-v1.0', 'llama', 'llama'),
         ('Qwen/Qwen3-1.7B', 'qwen3', 'chatml'),
         ('google/gemma-3-1b-it', 'gemma3_text', 'gemma'),
         ('microsoft/Phi-3.5-mini-instruct', 'phi3', 'phi3'),
         ('microsoft/Phi-4-mini-instruct', 'phi3', 'phi3')]

@pytest.mark.parametrize('name,family,template', CHATS, ids=[n for n, *_ in CHATS])
def test_default_template_from_tokenizer(name, family, template):
    assert llms[family].template_for(tokenizer_like(name)) == template
    assert template in templates

SMOL = dict(model_name_or_path='Qwen/Qwen3-0.6B', vision_tower='google/siglip2-so400m-patch16-naflex',
            connector_type='pixel_shuffle2x_mlp')

@pytest.mark.parametrize('stage', ['pretrain', 'finetune'])
def test_smolvlm_recipe_passes_checks(stage, smol_config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)                                   # the recipe names configs/zero2.json
    data = tmp_path / 'data.json'
    data.write_text(json.dumps([{'image': 'a.png', 'conversations': [{'from': 'human', 'value': '<image>\nHi'},
                                                                     {'from': 'gpt', 'value': 'Hello'}]}]))
    argv = [f'configs/{stage}_qwen3_siglip2_naflex.yaml', '--data_path', str(data), '--image_folder', str(tmp_path),
            '--output_dir', str(tmp_path / 'out'), '--use_cpu', 'true']
    if stage == 'finetune':                                   # stage 1's output: a TinyLLaVA config, built offline
        smol_config.save_pretrained(tmp_path / 'stage1')
        argv += ['--pretrained_model_path', str(tmp_path / 'stage1')]
    m, d, t = parse_args(argv)
    recipe = check_args(m, d, t)
    assert t.deepspeed == 'configs/zero2.json' and t.bf16
    if stage == 'pretrain':
        assert {k: getattr(m, k) for k in SMOL} == SMOL and d.conv_version == 'pretrain'
        assert llm_family(transformers.AutoConfig.for_model(**hub(m.model_name_or_path))).name == 'qwen3'
        assert (recipe.llm, recipe.vision_tower, recipe.connector) == ('frozen', 'frozen', 'full')
    else:
        assert d.conv_version == llms['qwen3'].template == 'chatml'
        assert (recipe.llm, recipe.vision_tower, recipe.connector) == ('full', 'frozen', 'full')


PUBLISHED_TEMPLATES = [('Qwen--Qwen3-1.7B', 'qwen3'), ('meta-llama--Llama-3.2-3B-Instruct', 'llama3'),
                       ('google--gemma-3-1b-it', 'gemma3'), ('microsoft--Phi-3.5-mini-instruct', 'phi3'),
                       ('microsoft--Phi-4-mini-instruct', 'phi3'), ('TinyLlama--TinyLlama-1.1B-Chat-v1.0', 'llama')]

@pytest.mark.parametrize('name,toy', PUBLISHED_TEMPLATES)
def test_chat_template_labels_published_templates(name, toy):
    "The `chat_template` template on each model's published Jinja (on a toy tokenizer of its format): 300 random"
    " conversations meet every label guarantee."
    import random
    from tinyllava_nb.data.template import ChatTemplate, check_encoding, random_conversation
    from tinyllava_nb.toy import toy_tokenizer
    tok = toy_tokenizer(toy)
    tok.chat_template = json.loads((HUB / f'{name}.tokenizer_config.json').read_text())['chat_template']
    rng = random.Random(0)
    for _ in range(300): check_encoding(ChatTemplate(), random_conversation(rng), tok)
