"""Can TinyLLaVA Factory's own loader (transformers 4.40) read a directory saved by tinyllava_nb, and does it give our logits?

Investigation script, not a test. Two halves, run in two venvs:

  # 1. transformers 5 (this repo's venv): toy models saved with save_pretrained_all, plus our logits
  OMP_NUM_THREADS=1 .venv/bin/python tests/data/tinyllava_factory/roundtrip.py save /tmp/rt
  # 2. transformers 4.40.2 venv that can import a TinyLLaVA Factory clone (commit 53f12c7)
  OMP_NUM_THREADS=1 /tmp/ref440/bin/python tests/data/tinyllava_factory/roundtrip.py load /tmp/rt /tmp/tlf
  # ablation: ROUNDTRIP_SKIP=rope (or keys, tok; comma-separated) before the second command leaves that fix out

`load` first tries each directory exactly as saved (tinyllava.model.load_model.load_pretrained_model, then
TinyLlavaForConditionalGeneration.from_pretrained) and prints what fails. Then it applies, to a copy, the config
fix proposed for our side (see FIX below) and compares TinyLLaVA Factory's logits with ours (max |diff|).
Cases: phi+siglip+mlp2x_gelu, llama+clip+mlp2x_gelu, qwen2+siglip+linear, gemma+siglip+mlp2x_gelu, plus
qwen2/phi with the real models' non-default RoPE (rope_theta 1e6; partial_rotary_factor 0.4) to catch rope fields
that transformers 4.40 does not read from transformers 5's `rope_parameters`.
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
    from tinyllava_nb.model.llm import llm_family
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
        save_pretrained_all(model, tok, proc, d)
        conv = [{'from': 'human', 'value': '<image>\nWhat is in the picture?'}, {'from': 'gpt', 'value': None}]
        ids = TemplateFactory(llm_family(fam).template)().encode(conv, tok, mode='infer')['input_ids']
        px = image_preprocess_of(model, proc)(img)[None]
        with torch.no_grad(): logits = model(input_ids=ids[None], images=px).logits[0]
        (d / 'plain_ids.json').write_text(json.dumps(tok('What is in the picture?').input_ids))
        img.save(d / 'image.png'); (d / 'prompt_ids.json').write_text(json.dumps(ids.tolist()))
        torch.save(dict(logits=logits, pixel_values=px), d / 'ours.pt')
        print(d.name, tuple(logits.shape))

def fix_config(d: Path):
    """FIX, applied to a copy (what our save would have to write so TLF can read it):
    1. config: names TLF can resolve. TLF's TinyLlavaConfig calls AutoConfig.from_pretrained(llm_model_name_or_path
       and vision_model_name_or_path), {Siglip,CLIP}ImageProcessor.from_pretrained(vision path), and picks the LLM and
       tower classes by substring of those names. Here: sub-folders <dir>/<family>-llm/config.json and
       <dir>/<tower>-vision/{config.json,preprocessor_config.json}, named by absolute path; tokenizer_name_or_path=<dir>;
       rope_theta / partial_rotary_factor copied out of rope_parameters into text_config (4.40 reads only flat fields).
    2. weights: vision_tower._vision_tower.X -> vision_tower._vision_tower.vision_model.X (HF {CLIP,Siglip}VisionModel).
    3. tokenizer.json: BPE merges as "a b" strings (tokenizers 0.19 cannot read [a, b] pairs); for byte-level BPE
       also vocab.json + merges.txt, which TLF's use_fast=False needs."""
    from safetensors.torch import load_file, save_file
    cfg = json.loads((d / 'config.json').read_text())
    t, v = cfg['text_config'], cfg['vision_config']
    fam, vt = t['model_type'], v['model_type'].replace('_vision_model', '')
    for k, val in (t.get('rope_parameters') or {}).items():
        if FIX_ROPE and k in ('rope_theta', 'partial_rotary_factor'): t[k] = val
    llm_dir, vis_dir = d / f'{TLF_LLM[fam]}-llm', d / f'{vt}-vision'
    llm_dir.mkdir(exist_ok=True); vis_dir.mkdir(exist_ok=True)
    (llm_dir / 'config.json').write_text(json.dumps(t, indent=2))
    (vis_dir / 'config.json').write_text(json.dumps(v, indent=2))
    shutil.copy(d / 'preprocessor_config.json', vis_dir / 'preprocessor_config.json')
    cfg.update(text_config=t, llm_model_name_or_path=str(llm_dir), vision_model_name_or_path=str(vis_dir),
               tokenizer_name_or_path=str(d))
    (d / 'config.json').write_text(json.dumps(cfg, indent=2))
    if FIX_KEYS:
        sd = load_file(d / 'model.safetensors'); pre = 'vision_tower._vision_tower.'
        sd = {(pre + 'vision_model.' + k[len(pre):] if k.startswith(pre) and not k.startswith(pre + 'vision_model.') else k): v
              for k, v in sd.items()}
        save_file(sd, d / 'model.safetensors', metadata={'format': 'pt'})
    if FIX_TOK:
        tj = json.loads((d / 'tokenizer.json').read_text()); m = tj['model']
        if m.get('type') == 'BPE' and m.get('merges') and isinstance(m['merges'][0], list):
            m['merges'] = [' '.join(x) for x in m['merges']]
            (d / 'tokenizer.json').write_text(json.dumps(tj, ensure_ascii=False))
            if (tj.get('pre_tokenizer') or {}).get('type') == 'ByteLevel' or 'ByteLevel' in json.dumps(tj.get('pre_tokenizer')):
                (d / 'vocab.json').write_text(json.dumps(m['vocab'], ensure_ascii=False))
                (d / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(m['merges']) + '\n')

# ablation: ROUNDTRIP_SKIP=rope,keys,tok leaves that part of the fix out
import os
SKIP = set(os.environ.get('ROUNDTRIP_SKIP', '').split(','))
FIX_ROPE, FIX_KEYS, FIX_TOK = 'rope' not in SKIP, 'keys' not in SKIP, 'tok' not in SKIP

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
    for src in sorted(p for p in out.iterdir() if p.is_dir() and not p.name.endswith('.fixed')):
        print(f'\n=== {src.name}')
        print('  as saved, load_pretrained_model:', first_error(lambda: load_pretrained_model(str(src), device='cpu')))
        print('  as saved, from_pretrained     :', first_error(lambda: TinyLlavaForConditionalGeneration.from_pretrained(str(src))))
        d = out / (src.name + '.fixed'); shutil.rmtree(d, ignore_errors=True); shutil.copytree(src, d); fix_config(d)
        print('  fixed, load_pretrained_model  :', first_error(lambda: load_pretrained_model(str(d), device='cpu')))
        try: print('  fixed, TLF tokenizer encodes "What is in the picture?" as ours:', load_pretrained_model(str(d), device='cpu')[1]('What is in the picture?').input_ids == json.loads((d / 'plain_ids.json').read_text()))
        except BaseException as e: pass
        print('  fixed, tokenizer (use_fast=False, as TLF):', first_error(lambda: real_auto_tok(str(d), use_fast=False)))
        print('  fixed, tokenizer (use_fast=True)         :', first_error(lambda: real_auto_tok(str(d), use_fast=True)))
        transformers.AutoTokenizer.from_pretrained = stub        # tokenizer is not needed for logits
        try:
            model, info = TinyLlavaForConditionalGeneration.from_pretrained(str(d), output_loading_info=True)
        except BaseException:
            print('  fixed, from_pretrained (stub tokenizer) FAILS:'); traceback.print_exc(limit=2); continue
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
