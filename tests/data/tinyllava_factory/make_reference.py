# transformers 4.40 side: TinyLLaVA Factory's own code builds the model, saves it as it saves a finetuned run, and
# writes reference logits and greedy tokens. The config then names the parts by their hub names, as released ones do.
import json, sys, types, shutil
from pathlib import Path
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, SiglipImageProcessor
for m in ['deepspeed', 'deepspeed.runtime', 'deepspeed.runtime.zero', 'deepspeed.runtime.zero.partition_parameters',
          'peft', 'peft.tuners', 'peft.tuners.lora']:
    sys.modules[m] = types.ModuleType(m)
sys.modules['deepspeed'].zero = None; sys.modules['deepspeed.runtime.zero.partition_parameters'].ZeroParamStatus = None
sys.modules['peft.tuners.lora'].LoraLayer = object
sys.path.insert(0, sys.argv[3])       # a clone of TinyLLaVA Factory (commit 53f12c7)
import transformers
# the model class loads a tokenizer it does not need for logits; tokenizers 0.19 cannot read the newer tokenizer.json
transformers.AutoTokenizer.from_pretrained = classmethod(lambda cls, *a, **k: types.SimpleNamespace(unk_token='<unk>', pad_token=None))
from tinyllava.model import TinyLlavaForConditionalGeneration, TinyLlavaConfig
HUB_LLM = dict(phi='microsoft/phi-2', llama='TinyLlama/TinyLlama-1.1B-Chat-v1.0', qwen2='Qwen/Qwen2-0.5B',
               stablelm='stabilityai/stablelm-2-zephyr-1_6b', gemma='google/gemma-2b-it')
HUB_VIS = dict(siglip='google/siglip-so400m-patch14-384', clip='openai/clip-vit-large-patch14-336')
out, parts = Path(sys.argv[1]), Path(sys.argv[2])
for d in sorted(out.iterdir()):
    fam, tower = d.name.split('-')
    p = parts / d.name
    llm_dir, vis_dir = p / f"{'tinyllama' if fam == 'llama' else fam}-llm", p / f'{tower}-vision'
    proc = (SiglipImageProcessor(size={'height': 32, 'width': 32}) if tower == 'siglip' else   # the published ones, at 32 px
            CLIPImageProcessor(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32}))
    proc.save_pretrained(vis_dir)
    pad = json.load(open(p / 'pad.json'))
    config = TinyLlavaConfig(llm_model_name_or_path=str(llm_dir), tokenizer_name_or_path=str(llm_dir),
                             vision_model_name_or_path=str(vis_dir), connector_type='mlp2x_gelu',
                             tokenizer_padding_side='right', tokenizer_model_max_length=2048, **pad)
    model = TinyLlavaForConditionalGeneration(config)
    ours, theirs = load_file(d / 'init.safetensors'), model.state_dict()
    sd = {k: ours[k if k in ours else k.replace('_vision_tower.vision_model.', '_vision_tower.')] for k in theirs}
    model.load_state_dict(sd, strict=True)
    model.config.tune_type_llm, model.config.tune_type_connector, model.config.tune_type_vision_tower = 'full', 'full', 'frozen'
    model.eval()
    ids = torch.tensor(json.loads((d / 'prompt_ids.json').read_text()))[None]
    px = model.vision_tower._image_processor(Image.open(d / 'image.png').convert('RGB'), return_tensors='pt')['pixel_values']
    with torch.no_grad():
        _, pos, mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, px)
        logits = model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
        gen = model.generate(ids, images=px, max_new_tokens=8, do_sample=False, pad_token_id=pad['pad_token_id'])
    model.save_pretrained(d, safe_serialization=True)
    for f in llm_dir.iterdir():
        if 'token' in f.name or f.name.endswith(('.model', '.txt')): shutil.copy(f, d / f.name)
    cfg = json.loads((d / 'config.json').read_text())
    cfg.update(llm_model_name_or_path=HUB_LLM[fam], tokenizer_name_or_path=HUB_LLM[fam], vision_model_name_or_path=HUB_VIS[tower])
    cfg['vision_config']['model_name_or_path'] = HUB_VIS[tower]
    cfg['text_config']['_name_or_path'] = HUB_LLM[fam]; cfg['vision_config']['_name_or_path'] = HUB_VIS[tower]
    (d / 'config.json').write_text(json.dumps(cfg, indent=2))
    (d / 'init.safetensors').unlink()
    torch.save(dict(logits=logits[0].clone(), greedy=gen[0].clone()), d / 'reference.pt')
    print(d.name, tuple(logits.shape), gen[0].tolist())
