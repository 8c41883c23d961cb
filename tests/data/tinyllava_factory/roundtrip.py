"""Can TinyLLaVA Factory's own loader (transformers 4.40) read a directory saved by tinyllava_nb, and does it give our logits?

Investigation script, not a test (it needs a second venv and a TinyLLaVA Factory clone). Two halves:

  # 1. transformers 5 (this repo's venv): toy models saved with save_pretrained_all, plus our logits
  OMP_NUM_THREADS=1 .venv/bin/python tests/data/tinyllava_factory/roundtrip.py save /tmp/rt
  # 2. transformers 4.40.2 venv that can import a TinyLLaVA Factory clone (commit 53f12c7)
  OMP_NUM_THREADS=1 /tmp/ref440/bin/python tests/data/tinyllava_factory/roundtrip.py load /tmp/rt /tmp/tlf

A real run records its parts by name (`microsoft/phi-2`, `google/siglip-so400m-patch14-384`), and TinyLLaVA
Factory reads each part's config, image processor and tokenizer from that name, picking the LLM and tower class
by a substring of it. So `save` first writes every toy part as such a directory (<family>-llm/ with config and
tokenizer, <tower>-vision/ with config and preprocessor config), points the model's config at them, as a run on
those directories would, and saves with save_pretrained_all. Nothing is changed after saving.
Cases: phi+siglip+mlp2x_gelu, llama+clip+mlp2x_gelu, qwen2+siglip+linear, gemma+siglip+mlp2x_gelu, plus
qwen2/phi with the real models' non-default RoPE (rope_theta 1e6; partial_rotary_factor 0.4).
"""
import json, sys, shutil, traceback, types
from pathlib import Path

CASES = [('phi', 'siglip', 'mlp2x_gelu', {}), ('llama', 'clip', 'mlp2x_gelu', {}), ('qwen2', 'siglip', 'linear', {}),
         ('gemma', 'siglip', 'mlp2x_gelu', {}),
         ('qwen2', 'siglip', 'mlp2x_gelu', {'rope_theta': 1e6}), ('phi', 'clip', 'mlp2x_gelu', {'partial_rotary_factor': 0.4})]
# TLF picks the LLM class by a substring of llm_model_name_or_path, the tower by vision_model_name_or_path
TLF_LLM = dict(phi='phi', llama='tinyllama', qwen2='qwen2', gemma='gemma', stablelm='stablelm')

def save(out: Path):
    import torch
    from PIL import Image, ImageDraw
    from tinyllava_nb.model.tinyllava import toy_tinyllava, save_pretrained_all, TinyLlavaForConditionalGeneration
    from tinyllava_nb.data.template import TemplateFactory
    from tinyllava_nb.model.llm import llm_family, save_tokenizer
    from tinyllava_nb.infer import image_preprocess_of
    img = Image.new('RGB', (40, 30), (240, 240, 240)); ImageDraw.Draw(img).ellipse([5, 3, 30, 25], fill=(200, 30, 30))
    for fam, tower, conn, rope in CASES:
        model, tok, proc = toy_tinyllava(fam, tower, conn, seed=3)
        if rope:                                    # rebuild with the real models' rope values
            model.config.text_config.rope_parameters.update(rope)
            sd = model.state_dict(); model = TinyLlavaForConditionalGeneration(model.config); model.load_state_dict(sd)
            model.vision_tower.image_processor = proc
        with torch.no_grad():                       # trained-like spread, so a missed scale shows in the logits
            for n, p in model.named_parameters():
                if p.dim() > 1: p.normal_(0, 0.5 if 'embed' in n else 0.2)
        model.eval()
        d = out / ('-'.join([fam, tower, conn]) + ''.join(f'-{k}{v:g}' for k, v in rope.items()))
        shutil.rmtree(d, ignore_errors=True)
        llm_dir, vis_dir = out / 'parts' / d.name / f'{TLF_LLM[fam]}-llm', out / 'parts' / d.name / f'{tower}-vision'
        model.config.text_config.save_pretrained(llm_dir); save_tokenizer(tok, llm_dir)
        model.config.vision_config.save_pretrained(vis_dir); proc.save_pretrained(vis_dir)
        c = model.config
        c.llm_model_name_or_path, c.tokenizer_name_or_path, c.vision_model_name_or_path = str(llm_dir), str(llm_dir), str(vis_dir)
        save_pretrained_all(model, tok, proc, d)
        conv = [{'from': 'human', 'value': '<image>\nWhat is in the picture?'}, {'from': 'gpt', 'value': None}]
        ids = TemplateFactory(llm_family(fam).template)().encode(conv, tok, mode='infer')['input_ids']
        px = image_preprocess_of(model, proc)(img)[None]
        with torch.no_grad(): logits = model(input_ids=ids[None], images=px).logits[0]
        (d / 'plain_ids.json').write_text(json.dumps(tok('What is in the picture?').input_ids))
        img.save(d / 'image.png'); (d / 'prompt_ids.json').write_text(json.dumps(ids.tolist()))
        torch.save(dict(logits=logits, pixel_values=px), d / 'ours.pt')
        print(d.name, tuple(logits.shape))

def first_error(f):
    try: f(); return None
    except BaseException as e: return f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'

def load(out: Path, tlf: str):
    import torch, transformers          # before the stubs below (transformers probes peft's spec at import)
    for m in ['deepspeed', 'deepspeed.runtime', 'deepspeed.runtime.zero', 'deepspeed.runtime.zero.partition_parameters',
              'peft', 'peft.tuners', 'peft.tuners.lora']:
        sys.modules[m] = types.ModuleType(m)
    sys.modules['deepspeed'].zero = None; sys.modules['deepspeed.runtime.zero.partition_parameters'].ZeroParamStatus = None
    sys.modules['peft.tuners.lora'].LoraLayer = object
    sys.path.insert(0, tlf)
    from PIL import Image
    from tinyllava.model import TinyLlavaForConditionalGeneration
    from tinyllava.model.load_model import load_pretrained_model
    real_auto_tok = transformers.AutoTokenizer.from_pretrained
    fp = TinyLlavaForConditionalGeneration.from_pretrained.__func__   # accelerate is absent here: drop low_cpu_mem_usage
    TinyLlavaForConditionalGeneration.from_pretrained = classmethod(lambda cls, *a, low_cpu_mem_usage=None, **k: fp(cls, *a, **k))
    stub = classmethod(lambda cls, *a, **k: types.SimpleNamespace(unk_token='<unk>', pad_token=None))
    for d in sorted(p for p in out.iterdir() if p.is_dir() and p.name != 'parts'):
        print(f'\n=== {d.name}')
        print('  load_pretrained_model:', first_error(lambda: load_pretrained_model(str(d), device='cpu')) or 'ok')
        try: print('  its tokenizer encodes "What is in the picture?" as ours:', load_pretrained_model(str(d), device='cpu')[1]('What is in the picture?').input_ids == json.loads((d / 'plain_ids.json').read_text()))
        except BaseException: pass
        print('  tokenizer (use_fast=False, as TLF):', first_error(lambda: real_auto_tok(json.loads((d / 'config.json').read_text())['tokenizer_name_or_path'], use_fast=False)) or 'ok')
        transformers.AutoTokenizer.from_pretrained = stub        # logits need no tokenizer (Llama's and Gemma's slow ones need tokenizer.model)
        try:
            model, info = TinyLlavaForConditionalGeneration.from_pretrained(str(d), output_loading_info=True)
        except BaseException:
            print('  from_pretrained (stub tokenizer) FAILS:'); traceback.print_exc(limit=2); continue
        finally: transformers.AutoTokenizer.from_pretrained = real_auto_tok
        print('  loading info:', {k: sorted(v)[:4] for k, v in info.items() if v} or 'all keys match')
        model.eval()
        ours = torch.load(d / 'ours.pt')
        ids = torch.tensor(json.loads((d / 'prompt_ids.json').read_text()))[None]
        px_theirs = model.vision_tower._image_processor(Image.open(d / 'image.png').convert('RGB'), return_tensors='pt')['pixel_values']
        print('  pixel_values max|diff| (their processor vs ours):', float((px_theirs - ours['pixel_values']).abs().max()))
        with torch.no_grad():
            _, pos, mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, ours['pixel_values'])
            logits = model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits[0]
        print(f'  logits {tuple(logits.shape)} vs ours {tuple(ours["logits"].shape)}: max|diff| =',
              float((logits - ours['logits']).abs().max()) if logits.shape == ours['logits'].shape else 'shape differs',
              ' (max|logit| %.2f)' % float(ours['logits'].abs().max()))

if __name__ == '__main__':
    if sys.argv[1] == 'save': save(Path(sys.argv[2]))
    else: load(Path(sys.argv[2]), sys.argv[3])
