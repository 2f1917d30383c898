"""The declaration travels as JSON in the configs clients call: it must read back equal, and a
damaged one must be refused with a reason rather than half-read."""

from __future__ import annotations

import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from client.split_contract import (
    CONTRACT_PARAMETER,
    ContractError,
    contract_from_json,
    contract_to_json,
)
from export.config import ModelConfig
from export.hstu import HSTUConfig, hstu_contract
from export.repositories import EVALUATION_REPOSITORY, MODEL_REPOSITORY
from export.split_contract import reference_contract
from export.split_repository import split_configs

HSTU = HSTUConfig.load("export/configs/hstu_causal.json")


@pytest.mark.parametrize("contract", [reference_contract(ModelConfig.load()),
                                      hstu_contract(HSTU)], ids=["reference", "hstu"])
def test_round_trip(contract) -> None:
    assert contract_from_json(contract_to_json(contract)) == contract


def test_damaged_declarations_are_refused() -> None:
    good = json.loads(contract_to_json(hstu_contract(HSTU)))
    with pytest.raises(ContractError, match="not valid JSON"):
        contract_from_json("{")
    with pytest.raises(ContractError, match="not a split contract"):
        contract_from_json(json.dumps({k: v for k, v in good.items() if k != "state"}))
    with pytest.raises(ContractError, match="history_mask 'full'"):
        contract_from_json(json.dumps({**good, "history_mask": "full", "appendable": False}))


@pytest.mark.parametrize("name,repository", [("ranker", MODEL_REPOSITORY),
                                             ("ranker_cached", MODEL_REPOSITORY),
                                             ("user_cache", MODEL_REPOSITORY),
                                             ("ranker_naive", EVALUATION_REPOSITORY),
                                             ("ranker_base", EVALUATION_REPOSITORY)])
def test_reference_configs_carry_the_declaration(name: str, repository) -> None:
    config = text_format.Parse((repository / name / "config.pbtxt").read_text(), mc.ModelConfig())
    text = config.parameters[CONTRACT_PARAMETER].string_value
    assert contract_from_json(text) == reference_contract(ModelConfig.load())


def test_split_configs_carry_the_declaration() -> None:
    contract = hstu_contract(HSTU)
    configs = split_configs(contract, max_candidates=10, naive_max_work=100)
    carried = {n for n, c in configs.items() if CONTRACT_PARAMETER in c.parameters}
    assert carried == {"ranker", "ranker_cached", "ranker_naive", "user_cache"}
    for name in carried:  # the clients' models, and the cache that serves from it
        assert contract_from_json(configs[name].parameters[CONTRACT_PARAMETER].string_value) \
            == contract, name
