"""ConvNeXt as a TinyLLaVA vision tower (one file): a CNN's feature map becomes image tokens, one per cell."""
from tinyllava_nb.model.vision import VisionTower, register_vision_tower, select_features

@register_vision_tower('convnext')
class ConvNextVisionTower(VisionTower):
    "A stage of ConvNeXt's feature pyramid, flattened: [N, C, h, w] -> [N, h*w, C] tokens."
    model_class, model_type, has_cls = 'ConvNextModel', 'convnext', False

    def forward(self, pixel_values, vision_feature_layer: int = -1, vision_feature_select_strategy: str = 'cls_patch'):
        fmap = self._vision_tower(pixel_values, output_hidden_states=True).hidden_states[vision_feature_layer]
        return select_features(fmap.flatten(2).transpose(1, 2), vision_feature_select_strategy)

    def num_tokens(self, strategy: str = 'cls_patch') -> int:
        cfg = self._vision_tower.config
        side = cfg.image_size // (cfg.patch_size * 2 ** (cfg.num_stages - 1))    # the stem, then /2 per later stage
        return side * side - (strategy == 'patch')

    @property
    def hidden_size(self) -> int: return self._vision_tower.config.hidden_sizes[-1]
