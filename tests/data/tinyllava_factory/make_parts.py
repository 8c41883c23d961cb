# TF5 side: the parts (configs, tokenizer, weights, a picture, a prompt) from which TinyLLaVA Factory's own code
# (transformers 4.40, ref.py) builds, saves and runs a checkpoint.
import json, sys, shutil, torch
from pathlib import Path
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tinyllava_nb.model.tinyllava import toy_tinyllava
from tinyllava_nb.data.template import TemplateFactory
from tinyllava_nb.model.llm import llm_family

CASES = [('phi', 'siglip'), ('llama', 'clip'), ('qwen2', 'siglip'), ('stablelm', 'clip'), ('gemma', 'siglip'), ('gemma', 'clip')]
out, parts = Path(sys.argv[1]), Path(sys.argv[2])
img = Image.new('RGB', (40, 30), (240, 240, 240)); ImageDraw.Draw(img).ellipse([5, 3, 30, 25], fill=(200, 30, 30))
for fam, tower in CASES:
    name = f'{fam}-{tower}'
    model, tok, proc = toy_tinyllava(fam, tower, 'mlp2x_gelu', seed=3)
    with torch.no_grad():         # weights of the spread trained ones have, so a missed scale shows in the logits
        for n, p in model.named_parameters():
            if p.dim() > 1: p.normal_(0, 0.5 if 'embed' in n else 0.2)
    d = out / name; shutil.rmtree(d, ignore_errors=True); d.mkdir(parents=True)
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, d / 'init.safetensors')
    img.save(d / 'image.png')
    conv = [{'from': 'human', 'value': '<image>\nWhat is in the picture?'}, {'from': 'gpt', 'value': None}]
    ids = TemplateFactory(llm_family(fam).template)().encode(conv, tok, mode='infer')['input_ids']
    (d / 'prompt_ids.json').write_text(json.dumps(ids.tolist()))
    p = parts / name; shutil.rmtree(p, ignore_errors=True)
    llm_dir, vis_dir = p / f"{'tinyllama' if fam == 'llama' else fam}-llm", p / f'{tower}-vision'
    model.config.text_config.save_pretrained(llm_dir); tok.save_pretrained(llm_dir)
    model.config.vision_config.save_pretrained(vis_dir)
    json.dump(dict(pad_token=tok.pad_token, pad_token_id=tok.pad_token_id), open(p / 'pad.json', 'w'))
    print(name, ids.shape)
