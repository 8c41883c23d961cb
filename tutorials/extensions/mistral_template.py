"""Mistral-Instruct's chat format as a TinyLLaVA template (file 1 of 2): `[INST] question [/INST] answer</s>`."""
from dataclasses import dataclass

from tinyllava_nb.data.template import Formatter, Template, register_template

@register_template('mistral')
@dataclass
class MistralTemplate(Template):
    format_user: Formatter = Formatter("[INST] {{content}} [/INST]")
    format_assistant: Formatter = Formatter(" {{content}}</s>")
    system: Formatter = Formatter("")
