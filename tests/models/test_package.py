"""The installed package on its own: `import zoo` is lazy but every submodule is an attribute,
and a config validates without the repository's configs/ folder on the path (the schema lives in
zoo/training/schema.py). Run in fresh interpreters outside the repository."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_submodules_are_lazy_attributes_of_a_plain_import(tmp_path):
    result = _python("""
        import sys
        import zoo
        assert "zoo.convert" not in sys.modules and "zoo.generate" not in sys.modules
        assert callable(zoo.convert.from_timm) and callable(zoo.convert.load_state_dict)
        assert callable(zoo.generate.generate) and callable(zoo.weight_files.save_safetensors)
        assert "zoo.convert" in sys.modules
        assert "convert" in dir(zoo)
        try:
            zoo.no_such_module
        except AttributeError as error:
            assert "no attribute 'no_such_module'" in str(error)
        else:
            raise AssertionError("zoo.no_such_module did not raise")
        print("ok")
    """, tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_a_config_validates_without_the_configs_folder(tmp_path):
    result = _python("""
        import sys
        try:
            import configs
        except ImportError:
            pass
        else:
            raise AssertionError(f"configs/ is importable from {configs.__file__}")
        from zoo.training import config as config_lib
        from zoo.training import schema
        c = schema.base_config("classification")
        c.model.name = "vit_ti16"
        c.model.overrides.update(dict(image_size=32, patch_size=4, embed_dim=32, depth=1,
                                      num_heads=2, num_classes=10))
        c.data.image_size = 32
        assert config_lib.validate_config(c, num_devices=8) == (8, 1, 1)
        c.batch_size = 12
        try:
            config_lib.validate_config(c, num_devices=8)
        except config_lib.ConfigError as error:
            print("ConfigError", error)
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ConfigError config.batch_size=12"), result.stdout
