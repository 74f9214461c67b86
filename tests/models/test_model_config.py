"""Model-side config sections: production defaults, the tiny preset, and validation through the platform loader."""

from __future__ import annotations

import subprocess
import sys

import pytest

from brainiac.models.config import AugmentConfig, BackboneConfig, ProjectionConfig, SSLConfig
from brainiac.platform.config import config_to_dict, from_dict
from brainiac.platform.errors import ConfigError


def test_defaults_are_brainiac_v2_production() -> None:
    cfg = BackboneConfig()
    assert (cfg.kind, cfg.img_size, cfg.patch_size) == ("vit", 96, 16)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim) == (768, 12, 12, 3072)
    assert cfg.pooling in ("cls", "mean") and cfg.conv1_t_stride == 2 and cfg.in_channels == 1
    assert ProjectionConfig().num_layers in (2, 3)
    assert SSLConfig().temperature > 0 and SSLConfig().gather_distributed


def test_tiny_preset_is_small() -> None:
    cfg = BackboneConfig.tiny("vit")
    assert cfg.img_size == 32 and cfg.hidden_size <= 96 and cfg.num_layers <= 2
    assert BackboneConfig.tiny("resnet", resnet_depth=18).resnet_depth == 18


@pytest.mark.parametrize("cls", [BackboneConfig, ProjectionConfig, SSLConfig, AugmentConfig])
def test_sections_round_trip_through_the_platform_loader(cls: type) -> None:
    data = config_to_dict(cls())
    assert from_dict(cls, data) == cls()


def test_loader_reads_values_and_ranges() -> None:
    aug = from_dict(AugmentConfig, {"gamma_range": [0.5, 2], "flip_axes": [0, 1], "device": "data"}, prefix="augment")
    assert aug.gamma_range == (0.5, 2.0) and aug.flip_axes == [0, 1] and aug.device == "data"
    with pytest.raises(ConfigError, match=r"augment\.noise_p.*<= 1"):
        from_dict(AugmentConfig, {"noise_p": 1.5}, prefix="augment")
    with pytest.raises(ConfigError, match=r"augment\.device"):
        from_dict(AugmentConfig, {"device": "gpu"}, prefix="augment")
    with pytest.raises(ConfigError, match=r"ssl\.temperature.*> 0"):
        from_dict(SSLConfig, {"temperature": 0}, prefix="ssl")
    with pytest.raises(ConfigError, match=r"model\.pooling"):
        from_dict(BackboneConfig, {"pooling": "first"}, prefix="model")
    with pytest.raises(ConfigError, match=r"projection\.num_layers.*<= 3"):
        from_dict(ProjectionConfig, {"num_layers": 4}, prefix="projection")
    with pytest.raises(ConfigError, match=r"model\.resnet_depth"):
        from_dict(BackboneConfig, {"resnet_depth": 101}, prefix="model")


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="patch_size"):
        BackboneConfig(img_size=96, patch_size=20)
    with pytest.raises(ConfigError, match="num_heads"):
        BackboneConfig(hidden_size=100, num_heads=12)
    BackboneConfig(kind="resnet", img_size=100, patch_size=16)  # ViT-only checks do not bind a ResNet
    with pytest.raises(ConfigError, match="gamma_range"):
        AugmentConfig(gamma_range=(1.5, 0.7))
    with pytest.raises(ConfigError, match="flip_axes"):
        AugmentConfig(flip_axes=[0, 0])
    assert all(
        getattr(AugmentConfig().disabled(), f) == 0.0 for f in AugmentConfig.__dataclass_fields__ if f.endswith("_p")
    )


def test_config_module_does_not_import_torch() -> None:
    code = "import sys, brainiac.models.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
