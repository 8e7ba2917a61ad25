"""The installed package on its own: `import zoo` is lazy but every submodule is an attribute,
and a config validates without the repository's configs/ folder on the path (the schema lives in
zoo/training/schema.py). Run in fresh interpreters outside the repository."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
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


def test_the_wheel_trains_loads_and_evaluates_outside_the_repository(tmp_path):
    """`pip wheel .`, installed alone into a folder (its dependencies are this venv's), then, in
    a folder with no repository: a user's own config file trained with the package's train
    entry point, evaluated with its eval entry point, and `zoo.load(...).evaluate()` equal to
    that evaluation."""
    repo = pathlib.Path(__file__).resolve().parents[2]
    target = tmp_path / "site"
    def pip(*args):
        result = subprocess.run([sys.executable, "-m", "pip", *args, "-q"], capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    # Built from a copy of what the package is made of, so no build/ folder lands in the
    # checkout (setuptools reuses one, and a stale one could leak old modules into a wheel).
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "zoo", "kernels_pallas"):
        copy = shutil.copytree if (repo / name).is_dir() else shutil.copy
        copy(repo / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                           if (repo / name).is_dir() else {}))
    pip("wheel", str(source), "--no-deps", "-w", str(tmp_path / "dist"))
    wheels = [str(w) for w in (tmp_path / "dist").glob("attention_zoo-*.whl")]
    assert len(wheels) == 1, wheels
    pip("install", "--no-deps", "--target", str(target), *wheels)
    assert (target / "bin" / "zoo-train").exists()  # the console scripts come with it
    (tmp_path / "my_config.py").write_text(textwrap.dedent("""
        from zoo.training.schema import base_config

        def get_config():
            c = base_config("classification")
            c.model.name = "vit_ti16"
            c.model.overrides.update(dict(image_size=16, patch_size=4, embed_dim=32, depth=1,
                                          num_heads=2, num_classes=10))
            c.data.image_size = 16
            c.data.num_train_examples, c.data.num_eval_examples = 64, 32
            c.batch_size = c.eval.batch_size = 16
            c.total_steps, c.checkpoint_every, c.eval_every = 4, 4, 0
            c.schedule.warmup_steps = 1
            c.logging.progress_bar = c.logging.tensorboard = False
            return c
    """))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(target))
    flags = ["--config", str(tmp_path / "my_config.py"), "--workdir", str(tmp_path / "run")]
    for module in ("zoo.training.train_main", "zoo.training.eval_main"):
        result = subprocess.run([sys.executable, "-m", module, *flags], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    code = textwrap.dedent(f"""
        import json, zoo
        assert zoo.__file__.startswith({str(target)!r}), zoo.__file__
        try:
            import configs
        except ImportError:
            pass
        else:
            raise AssertionError("configs/ is importable")
        run = zoo.load({str(tmp_path / 'run')!r})
        print(json.dumps({{"step": run.step, **run.evaluate()}}))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == evaluated
