"""tests/check_mutations.py's list stays runnable: every mutation still finds the code it breaks (once) and names
tests that exist. The mutations themselves run outside CI (~16 min): `python tests/check_mutations.py`."""

import shlex

import pytest
from check_mutations import MUTATIONS, problems

from conftest import REPO


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.id for m in MUTATIONS])
def test_mutation_still_applies_and_names_existing_tests(mutation):
    assert problems(mutation) == []
    for selection in mutation.tests:
        path, _, name = shlex.split(selection)[0].partition("::")
        source = (REPO / path).read_text()
        assert not name or f"def {name.split('[')[0]}(" in source, selection


def test_mutation_ids_are_unique():
    ids = [m.id for m in MUTATIONS]
    assert len(ids) == len(set(ids))
