"""The adversarial suite: every test here carries the `adversarial` marker. (Its tool for interrupting a
call between the Triton interpreter's programs, the `interrupter` fixture, lives in tests/conftest.py.)"""
import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/adversarial/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.adversarial)
