"Inference: the optional Gradio app (skipped where gradio is not installed), and where generation stops."
import pytest, torch
from PIL import Image

def test_gradio_app_turn():
    pytest.importorskip('gradio')
    from tinyllava_nb.model.tinyllava import toy_tinyllava
    from tinyllava_nb.infer import chat, gradio_app
    model, tok, proc = toy_tinyllava('phi', 'siglip', 'mlp2x_gelu')
    model.eval()
    app = gradio_app(model, tok, proc, 'phi', max_new_tokens=4)
    img = Image.new('RGB', (40, 40), 'red')
    shown, history, box = app.respond(img, 'What colour?', [])
    assert box == '' and len(history) == 1 and history[0][0].startswith('<image>')
    assert shown[-1] == {'role': 'assistant', 'content': chat(model, tok, proc, img, 'What colour?', 'phi', max_new_tokens=4)}
    shown, history, _ = app.respond(img, 'And the shape?', history)
    assert len(history) == 2 and len(shown) == 4


def test_generation_stops_at_the_templates_end_of_turn():
    "Phi-3's answers end with <|end|>, not its tokenizer's EOS: `stop_ids_of` adds it, and decoding stops there."
    from tinyllava_nb.infer import stop_ids_of
    from tinyllava_nb.model.tinyllava import toy_tinyllava
    model, tok, _ = toy_tinyllava('phi3', 'siglip', 'mlp2x_gelu')
    end = tok.convert_tokens_to_ids('<|end|>')
    assert stop_ids_of(model, tok, 'phi3') == sorted({tok.eos_token_id, end})
    only_end = lambda m, i, out: torch.where(torch.arange(out.shape[-1]) == end, 100., -100.).expand_as(out)
    model.language_model.lm_head.register_forward_hook(only_end)        # a model that always ends its turn
    ids = torch.tensor([[5, 6, 7]])
    assert model.decode(ids, max_new_tokens=5).shape[1] == 5           # its EOS alone: it never stops
    assert model.decode(ids, max_new_tokens=5, eos_token_id=stop_ids_of(model, tok, 'phi3')).tolist() == [[end]]
