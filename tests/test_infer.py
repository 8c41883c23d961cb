"The optional Gradio app: builds, and a turn answers like chat() (skipped where gradio is not installed)."
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
