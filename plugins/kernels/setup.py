"""Build of kd-kernels' native module (kd_kernels._ext) with MLX's CMake helper.

Install it against the MLX already in the environment (the module links to that libmlx):
``pip install --no-build-isolation -e plugins/kernels`` (scripts/setup.sh does; cmake and
nanobind must be installed first, see pyproject.toml's build requirements).
"""

from mlx import extension
from setuptools import setup

if __name__ == "__main__":
    setup(
        ext_modules=[extension.CMakeExtension("kd_kernels._ext")],
        cmdclass={"build_ext": extension.CMakeBuild},
        package_data={"kd_kernels": ["*.so", "*.pyd", "*.dylib"]},
        zip_safe=False,
    )
