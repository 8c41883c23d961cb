"`decode` (the fast path of chat and generate_batch) gives `generate`'s tokens on every LLM family."
import pytest, torch
from transformers.generation.streamers import BaseStreamer

from tinyllava_nb.infer import chat, conv_version_of, encode_question, generate_batch, generation_kwargs
from tinyllava_nb.model.tinyllava import toy_tinyllava

FAMILIES = ['phi', 'llama', 'qwen2', 'gemma', 'stablelm']
QUESTIONS = ['What colour is the shape?', 'Where is the small red circle in the picture?', 'Which shape?',
             'Is there a square on the left of the big blue triangle?']


def left_padded(model, tok, n):
    "(prompts, a left-padded batch of them, its mask, images): `n` prompts of different lengths, one image each."
    prompts = [encode_question(QUESTIONS[i % 4] + ' x' * i, tok, conv_version_of(model))['input_ids'] for i in range(n)]
    width = max(map(len, prompts))
    ids, mask = torch.full((n, width), tok.pad_token_id), torch.zeros(n, width, dtype=torch.long)
    for i, p in enumerate(prompts): ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return prompts, ids, mask, torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))


@pytest.fixture(scope='module', params=FAMILIES)
def toy(request):
    model, tok, proc = toy_tinyllava(request.param, 'siglip', 'mlp2x_gelu')
    return request.param, model.eval(), tok, proc


@pytest.mark.parametrize('sampling', [{}, dict(temperature=0.7, top_p=0.9), dict(temperature=1.3)])
def test_equal_to_generate_at_batch_1_and_in_a_padded_batch(toy, sampling):
    family, model, tok, _ = toy
    prompts, ids, mask, images = left_padded(model, tok, 3)
    gen = dict(do_sample=True, **sampling) if sampling else dict(do_sample=False)
    for x, im, m in [(p[None], images[i:i + 1], None) for i, p in enumerate(prompts)] + [(ids, images, mask)]:
        torch.manual_seed(3); theirs = model.generate(x, images=im, attention_mask=m, max_new_tokens=12, **gen)
        torch.manual_seed(3); ours = model.decode(x, im, m, max_new_tokens=12, **sampling)
        assert torch.equal(ours, theirs), (family, sampling)


def test_end_token_pads_finished_rows_like_generate(toy):
    family, model, tok, _ = toy
    _, ids, mask, images = left_padded(model, tok, 3)
    free = model.decode(ids, images, mask, max_new_tokens=8, eos_token_id=[])
    assert free.shape == (3, 8)
    eos = int(free[0, 2])                                                    # row 0 ends at its third token
    ours = model.decode(ids, images, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    theirs = model.generate(ids, images=images, attention_mask=mask, max_new_tokens=8, do_sample=False,
                            eos_token_id=eos, pad_token_id=tok.pad_token_id)
    assert torch.equal(ours, theirs) and (ours[0, 3:] == tok.pad_token_id).all()


def test_batch_16_equals_batch_1_through_generate_batch(toy):
    family, model, tok, _ = toy
    prompts, _, _, images = left_padded(model, tok, 16)
    gen = generation_kwargs(max_new_tokens=6)
    single = [generate_batch(model, tok, [p], [images[i]], **gen)[0] for i, p in enumerate(prompts)]
    assert generate_batch(model, tok, prompts, list(images), **gen) == single


class Recorder(BaseStreamer):
    def __init__(self): self.calls = []
    def put(self, value): self.calls.append(value.tolist())
    def end(self): self.calls.append('end')


def test_streamer_sees_what_generate_shows_it():
    model, tok, _ = toy_tinyllava('phi')
    model.eval()
    ids = encode_question('What colour is the shape?', tok, 'phi')['input_ids'][None]
    pixels = torch.randn(1, 3, 32, 32)
    ours, theirs = Recorder(), Recorder()
    model.decode(ids, pixels, max_new_tokens=5, eos_token_id=[], streamer=ours)
    model.generate(ids, images=pixels, max_new_tokens=5, do_sample=False, eos_token_id=None, streamer=theirs)
    assert ours.calls == theirs.calls and len(ours.calls) == 7 and ours.calls[0] == [[]] and ours.calls[-1] == 'end'


def test_context_limit_is_the_same_error():
    model, tok, _ = toy_tinyllava('llama')
    ids = encode_question('What colour?', tok, 'llama')['input_ids'][None]
    pixels = torch.randn(1, 3, 32, 32)
    context = model.config.text_config.max_position_embeddings
    errors = []
    for run in (lambda: model.decode(ids, pixels, max_new_tokens=context),
                lambda: model.generate(ids, images=pixels, max_new_tokens=context)):
        with pytest.raises(ValueError, match="exceeds the LLM's context") as e: run()
        errors.append(str(e.value))
    assert errors[0] == errors[1]
    prompt = model.prepare_inputs(ids, None, None, pixels)['inputs_embeds'].shape[1]
    assert model.decode(ids, pixels, max_new_tokens=context - prompt, eos_token_id=[]).shape[1] == context - prompt


def test_chat_uses_decode_and_beams_use_generate(monkeypatch):
    model, tok, proc = toy_tinyllava('phi')
    model.eval()
    from PIL import Image
    img = Image.new('RGB', (40, 40), 'red')
    expected = chat(model, tok, proc, img, 'What colour?', max_new_tokens=5)
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, 'generate', lambda *a, **k: calls.append(k.get('num_beams')) or generate(*a, **k))
    assert chat(model, tok, proc, img, 'What colour?', max_new_tokens=5) == expected and calls == []
    sampled = chat(model, tok, proc, img, 'What colour?', temperature=0.8, top_p=0.9, max_new_tokens=5)
    assert calls == [] and isinstance(sampled, str)
    chat(model, tok, proc, img, 'What colour?', num_beams=2, max_new_tokens=5)
    assert calls == [2]
