"""Which machine answers for a name (flakefleet.identity): what is expected, and remembered."""

from __future__ import annotations

from pathlib import Path

from flakefleet.identity import Identities, mismatch


def test_a_machine_id_is_expected_only_behind_the_host_key_it_was_seen_with(tmp_path):
    fleet = tmp_path / "fleet.yaml"
    identities = Identities(tmp_path, fleet)
    assert identities.expected("web1", "ssh-ed25519 AAAA1") == ""  # never deployed: any
    identities.remember("web1", "ssh-ed25519 AAAA1", "id-one")

    again = Identities(tmp_path, fleet)  # another run reads what this one wrote
    assert again.expected("web1", "ssh-ed25519 AAAA1") == "id-one"
    # A host key SSH accepted since (the user trusted it: a reinstall): any id, recorded anew.
    assert again.expected("web1", "ssh-ed25519 AAAA2") == ""
    assert again.expected("web2", "ssh-ed25519 AAAA1") == ""
    # Another fleet file's web1 is another machine.
    assert Identities(tmp_path, tmp_path / "other.yaml").expected("web1", "ssh-ed25519 AAAA1") == ""
    assert identities.path.parent == tmp_path / ".flakefleet" / "identities"
    assert Path(identities.path).stat().st_size > 0


def test_the_refusal_names_both_ids_and_how_to_accept_the_new_one():
    text = mismatch("web1", "b2", "a1", "10.0.0.5:22")
    assert text.startswith("another machine answers for web1: machine id b2, but web1 had a1")
    assert "(10.0.0.5:22)" in text and "nothing was touched" in text
    assert text.endswith("--data accept_machine_id=b2")
