"""The method registry: explicit, name clashes are errors, unknown names list the known."""

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
