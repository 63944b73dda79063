"""The method registry: explicit, name clashes are errors, unknown names list the known."""

import os
import subprocess
import sys

import pytest

from genforge.train import Method, RegistryError, available_methods, get_method, register_method


@register_method("toy_registry_tests_a")
class ToyA(Method):
    pass


def test_registered_method_is_found_by_name_and_knows_its_name():
    assert get_method("toy_registry_tests_a") is ToyA
    assert ToyA.name == "toy_registry_tests_a"
    assert "toy_registry_tests_a" in available_methods()


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(RegistryError, match="already registered.*ToyA"):
        @register_method("toy_registry_tests_a")
        class Impostor(Method):
            pass
    assert get_method("toy_registry_tests_a") is ToyA


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(RegistryError, match="unknown method 'nope'.*toy_registry_tests_a"):
        get_method("nope")


BUILT_IN = {"classifier", "diffusion_probe", "dimr", "dit", "unet2d", "arflow", "sit",  # genforge.methods
            "vq_tokenizer", "enat", "maskgit", "amused",  # genforge.methods.masked_tokens
            "kd", "meal_v2", "reinforced", "specialists", "concentration", "m2mkd", "modular_student",  # genforge.kd
            "sd_text_to_image", "sd_distill"}  # genforge.sd


def test_every_built_in_method_registers_without_the_caller_importing_its_package():
    """A fresh interpreter that imports only the training package finds the generic, kd and sd methods."""
    code = "from genforge.train import available_methods; print(' '.join(available_methods()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(done.stdout.split()) == BUILT_IN
