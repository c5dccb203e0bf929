"""The adapter file names we read and write are PEFT's own: pinned to ``peft.utils.constants`` so they cannot drift."""

from peft.utils import constants

from optimum_neuron_peft.transformations.names import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_PICKLE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
)


def test_adapter_file_names_are_peft_constants():
    assert ADAPTER_CONFIG_NAME == constants.CONFIG_NAME
    assert ADAPTER_WEIGHTS_NAME == constants.SAFETENSORS_WEIGHTS_NAME
    assert ADAPTER_PICKLE_WEIGHTS_NAME == constants.WEIGHTS_NAME
