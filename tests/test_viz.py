"The Monitor and plots of tinyllava_nb.viz on random toy models: shapes, sums, grids, unchanged tokens, figures."
import html, warnings

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pytest
import torch
from PIL import Image

from tinyllava_nb.infer import conv_version_of, encode_question, generate_batch, image_preprocess_of
from tinyllava_nb.model.tinyllava import toy_tinyllava
from tinyllava_nb.viz import Monitor, MonitoredChat, TemplateExplorer, parse_conversation, patch_grid, show_patches

IMG = Image.new('RGB', (40, 30), (200, 30, 30))


def _monitored(llm, vision='clip', connector='mlp2x_gelu', questions=('Hi?', 'What is in this picture?'), **kw):
    m, t, p = toy_tinyllava(llm, vision, connector, **kw)
    prompts = [encode_question(q, t, conv_version_of(m))['input_ids'] for q in questions]
    pix = [image_preprocess_of(m, p)(IMG)] * len(prompts)
    plain = generate_batch(m, t, prompts, pix, max_new_tokens=6)
    with pytest.warns(UserWarning, match='eager'), Monitor(m, t) as mon:
        monitored = generate_batch(m, t, prompts, pix, max_new_tokens=6)
    return m, mon, plain, monitored


@pytest.mark.parametrize('llm', ['phi', 'llama', 'gemma', 'qwen2', 'stablelm'])
def test_monitor_records(llm):
    m, mon, plain, monitored = _monitored(llm)
    assert monitored == plain                                            # monitoring changes nothing
    assert m.language_model.config._attn_implementation == 'sdpa'        # and is undone
    assert 'prepare_inputs' not in vars(m) and 'generate' not in vars(m)
    L, N, B, H = len(mon.layers), mon.tokens.shape[1], 2, m.config.text_config.num_attention_heads
    W = mon.prompt_ids.shape[1]
    assert mon.attn.shape == (L, N, B, H, W + N - 1)
    torch.testing.assert_close(mon.attn.sum(-1), torch.ones(L, N, B, H), atol=1e-4, rtol=0)
    torch.testing.assert_close(mon.probs.sum(-1), torch.ones(N, B), atol=1e-4, rtol=0)
    assert torch.equal(mon.probs.argmax(-1).T, mon.tokens)               # greedy took the top token
    for b in range(B):
        kinds = mon.kinds(b)
        assert kinds.count('image') == m.num_image_tokens
        pad = torch.tensor([k == 'pad' for k in kinds])
        assert float(mon.attn[:, :, b][..., pad].abs().sum()) == 0       # padding gets no attention
    assert 'pad' in mon.kinds(0) and 'pad' not in mon.kinds(1)          # the short prompt is left padded
    side = m.config.vision_config.image_size // m.config.vision_config.patch_size
    grid = mon.image_attention(sample=1)
    assert grid.shape == (N, side, side)
    share = mon.attention(sample=1)[:, [k == 'image' for k in mon.kinds(1)]].sum(-1)
    torch.testing.assert_close(grid.flatten(1).nansum(-1), share)
    matrix, names = mon.text_attention(sample=0)
    torch.testing.assert_close(matrix.sum(-1), torch.ones(N), atol=1e-4, rtol=0)
    assert len(names) == matrix.shape[1] and any(n.startswith('<image>') for n in names)
    for fig in (mon.plot_image_attention(), mon.plot_text_attention(layer=0, heads=[0, 1]), mon.plot_top_k(3),
                mon.plot_image_share()):
        assert isinstance(fig, plt.Figure)
        plt.close(fig)


def test_heads_and_layers():
    _, mon, _, _ = _monitored('llama')
    a0, a1 = mon.attention(0, heads=0), mon.attention(0, heads=1)
    torch.testing.assert_close((a0 + a1) / 2, mon.attention(0, heads=[0, 1]))
    assert not torch.equal(mon.attention(0), mon.attention(-1))
    assert mon.image_share().shape == (len(mon.layers), mon.tokens.shape[1])


def test_siglip_patch_drops_first_patch():
    m, mon, _, _ = _monitored('phi', 'siglip')
    side, index = patch_grid(m)
    assert len(index) == side * side - 1 and int(index[0]) == 1
    grid = mon.image_attention()
    assert torch.isnan(grid[:, 0, 0]).all() and not torch.isnan(grid[:, 1:]).any()


def test_no_grid_for_resampler():
    m, mon, _, _ = _monitored('phi', 'clip', 'resampler')
    with pytest.raises(ValueError, match='do not map to patches'):
        mon.image_attention()
    fig = show_patches(m, m.vision_tower.image_processor, IMG)
    assert 'makes 4 image tokens' in fig.axes[0].get_title()
    plt.close(fig)


def test_beam_search_refused():
    m, t, p = toy_tinyllava('phi')
    ids = encode_question('Hi?', t, conv_version_of(m))['input_ids']
    with warnings.catch_warnings(action='ignore'), Monitor(m, t):
        with pytest.raises(ValueError, match='not beam search'):
            generate_batch(m, t, [ids], [image_preprocess_of(m, p)(IMG)], max_new_tokens=3, num_beams=2)
    assert m.language_model.config._attn_implementation == 'sdpa'


def test_template_explorer():
    ex = TemplateExplorer()
    assert 'tokens trained' in ex.out.value
    ex.text.value = 'human: hi\ngpt: there\nsecond line'
    assert parse_conversation(ex.text.value)[1]['value'] == 'there\nsecond line'
    ex.text.value = 'gpt: no question'
    assert 'bad role' in ex.out.value
    ex.text.value = 'no role here'
    assert 'no role' in ex.out.value


def test_monitored_chat():
    m, t, p = toy_tinyllava('qwen2')
    w = MonitoredChat(m, t, p, max_new_tokens=4)
    w.set_image(IMG)
    with warnings.catch_warnings(action='ignore'):
        answer = w.ask('What colour?')
    assert w.bars.value[:4] == b'\x89PNG' and w.heat.value[:4] == b'\x89PNG'
    assert w.monitor.tokens.shape[0] == 1 and html.escape(answer) in w.log.value
