"Label guarantees of every template x toy tokenizer on 1,000 random conversations each (the notebook runs 150)."
import pytest
from tinyllava_nb.data.template import fuzz_templates, templates
from tinyllava_nb.toy import toy_tokenizers

@pytest.mark.parametrize('name', templates.names())
def test_fuzz_template(name):
    n_tokenizers = len(toy_tokenizers) + 1          # + llama with legacy=True
    assert fuzz_templates(1000, seed=sum(map(ord, name)), names=[name]) == 1000 * n_tokenizers
