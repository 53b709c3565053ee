"""The node agent's id kept in its data dir: the same across restarts, never shared by two live agents."""

from __future__ import annotations

from pathlib import Path

from ops.agent_identity import claim_identity


def test_an_agent_started_again_on_its_data_dir_gets_the_same_id(tmp_path: Path) -> None:
    first = claim_identity(tmp_path / "agent")
    assert first.kept
    first.release()  # the process ended (the kernel drops the lock of a killed one the same way)
    again = claim_identity(tmp_path / "agent")
    assert again.agent_id == first.agent_id and again.kept
    again.release()
    assert claim_identity(tmp_path / "elsewhere").agent_id != first.agent_id


def test_a_second_live_agent_on_the_same_data_dir_gets_an_id_of_its_own(tmp_path: Path) -> None:
    holder = claim_identity(tmp_path)
    other = claim_identity(tmp_path)
    assert other.agent_id != holder.agent_id and not other.kept
    holder.release()


def test_a_damaged_id_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "agent-id").write_text("not an id\n")
    identity = claim_identity(tmp_path)
    assert identity.agent_id.startswith("a") and len(identity.agent_id) == 13
    assert (tmp_path / "agent-id").read_text().strip() == identity.agent_id
    identity.release()
