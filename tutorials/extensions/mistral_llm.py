"""Mistral as a TinyLLaVA LLM (file 2 of 2): its causal-LM class, default chat template and tokenizer rule."""
from tinyllava_nb.model.llm import register_llm

import mistral_template  # noqa: F401  (file 1 of 2: registers the 'mistral' template)

@register_llm('mistral', 'MistralForCausalLM', template='mistral')
def pad_with_unk(tokenizer):
    "Mistral's tokenizer has no pad token; pad with <unk> (never trained: the attention mask comes from lengths)."
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer
