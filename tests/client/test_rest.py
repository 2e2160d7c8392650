"""RestClient against a real `tinkex serve` process: runs, checkpoints, sessions, samplers."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

import tinkex
from tinkex import types

from ..conftest import ALICE, BOB
from .conftest import MODEL, sft_datum


@pytest.fixture(scope="module")
def rest(server) -> tinkex.RestClient:
    return tinkex.RestClient(base_url=server.base_url, api_key=ALICE)


@pytest.fixture(scope="module")
def run(service_client, tokenizer):
    trainer = service_client.create_lora_training_client(MODEL, rank=4, user_metadata={"purpose": "rest"}).result(60)
    trainer.forward_backward([sft_datum(tokenizer.encode("checkpoint me please"))], "cross_entropy")
    trainer.optim_step(types.AdamParams())
    paths = [trainer.save_state(f"step-{i}").result(60).path for i in range(3)]
    sampler_path = trainer.save_weights_for_sampler("for-sampling").result(60).path
    return trainer, paths, sampler_path


def test_server_capabilities(rest, service_client):
    capabilities = rest.get_server_capabilities().result(30)
    names = [m.model_name for m in capabilities.supported_models]
    assert MODEL in names
    assert service_client.get_server_capabilities() == capabilities


def test_training_runs(rest, run):
    trainer, paths, _ = run
    got = rest.get_training_run(trainer.model_id).result(30)
    assert got.training_run_id == trainer.model_id and got.base_model == MODEL and got.is_lora
    assert got.lora_rank == 4 and got.user_metadata == {"purpose": "rest"}
    assert got.last_checkpoint.tinker_path == paths[-1]
    assert rest.get_training_run_by_tinker_path(paths[0]).result(30) == got
    listed = rest.list_training_runs(limit=100).result(30)
    assert trainer.model_id in [r.training_run_id for r in listed.training_runs]
    assert listed.cursor.total_count >= 1
    page = rest.list_training_runs(limit=1, offset=0).result(30)
    assert len(page.training_runs) == 1
    with pytest.raises(types.NotFoundError):
        rest.get_training_run("no-such-session:train:0").result(30)


def test_checkpoint_listing_and_weights_info(rest, run):
    trainer, paths, sampler_path = run
    checkpoints = rest.list_checkpoints(trainer.model_id).result(30).checkpoints
    by_path = {c.tinker_path: c for c in checkpoints}
    assert set(paths) | {sampler_path} <= set(by_path)
    first = by_path[paths[0]]
    assert first.checkpoint_id == "weights/step-0" and first.checkpoint_type == "training"
    assert by_path[sampler_path].checkpoint_type == "sampler"
    assert first.size_bytes and first.size_bytes > 0 and not first.public
    mine = rest.list_user_checkpoints(limit=1000).result(30).checkpoints
    assert set(paths) <= {c.tinker_path for c in mine}
    info = rest.get_weights_info_by_tinker_path(paths[0]).result(30)
    assert info.base_model == MODEL and info.is_lora and info.lora_rank == 4


def test_publish_ttl_and_delete(rest, run):
    trainer, paths, _ = run
    path = paths[1]

    def current() -> types.Checkpoint:
        return next(c for c in rest.list_checkpoints(trainer.model_id).result(30).checkpoints
                    if c.tinker_path == path)

    rest.publish_checkpoint_from_tinker_path(path).result(30)
    assert current().public
    rest.unpublish_checkpoint_from_tinker_path(path).result(30)
    assert not current().public

    rest.set_checkpoint_ttl_from_tinker_path(path, 7200).result(30)
    expires = current().expires_at
    assert expires is not None
    assert timedelta(minutes=110) < expires - datetime.now(timezone.utc) < timedelta(minutes=130)
    rest.set_checkpoint_ttl_from_tinker_path(path, None).result(30)
    assert current().expires_at is None
    with pytest.raises(types.BadRequestError):
        rest.set_checkpoint_ttl_from_tinker_path(path, 10).result(30)

    rest.delete_checkpoint_from_tinker_path(path).result(30)
    assert path not in {c.tinker_path for c in rest.list_checkpoints(trainer.model_id).result(30).checkpoints}
    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(paths[2])
    rest.delete_checkpoint(parsed.training_run_id, parsed.checkpoint_id).result(30)
    with pytest.raises(types.NotFoundError):
        rest.delete_checkpoint_from_tinker_path(paths[2]).result(30)


def test_publishing_twice_is_a_final_conflict(rest, run):
    """409 is retryable by default; the server marks this one final (x-should-retry: false)."""
    _, paths, _ = run
    rest.publish_checkpoint_from_tinker_path(paths[0]).result(30)
    with pytest.raises(types.ConflictError):
        rest.publish_checkpoint_from_tinker_path(paths[0]).result(30)
    rest.unpublish_checkpoint_from_tinker_path(paths[0]).result(30)


def test_other_tenants_see_nothing(server, run):
    trainer, paths, _ = run
    other = tinkex.RestClient(base_url=server.base_url, api_key=BOB)
    with pytest.raises(types.NotFoundError):
        other.get_training_run(trainer.model_id).result(30)


def test_sessions_and_samplers(rest, service_client, run, base_sampler):
    trainer, _, _ = run
    session_id = service_client.session_id
    assert session_id and session_id in rest.list_sessions(limit=100).result(30).sessions
    session = rest.get_session(session_id).result(30)
    assert trainer.model_id in session.training_run_ids
    assert base_sampler.sampling_session_id in session.sampler_ids
    sampler = rest.get_sampler(base_sampler.sampling_session_id).result(30)
    assert sampler.base_model == MODEL and sampler.sampler_id == base_sampler.sampling_session_id


def test_checkpoint_archive_download(rest, run, tmp_path):
    trainer, paths, _ = run
    target = rest.download_checkpoint(paths[0], tmp_path).result(120)
    assert target == tmp_path / paths[0][len("tinker://"):].replace("/", "_")
    files = [p for p in target.rglob("*") if p.is_file()]
    assert files and sum(p.stat().st_size for p in files) > 0
    with pytest.raises(FileExistsError):
        rest.download_checkpoint(paths[0], tmp_path)


def test_async_forms(rest, run):
    trainer, paths, _ = run

    async def main():
        return await asyncio.gather(rest.get_training_run_async(trainer.model_id),
                                    rest.list_checkpoints_async(trainer.model_id),
                                    rest.list_training_runs_async(), rest.get_training_run(trainer.model_id))

    got, checkpoints, runs, again = asyncio.run(main())
    assert got == again and got.training_run_id == trainer.model_id
    assert checkpoints.checkpoints and runs.training_runs


def test_external_weights_export_and_download(rest, run, tmp_path):
    trainer, _, _ = run
    exported = trainer.save_weights_external("hf-export").result(60)
    assert exported.path == f"tinker://{trainer.model_id}/external_weights/hf-export"
    urls = rest.get_external_weights_urls(exported.path).result(30)
    assert urls.urls and urls.expires > datetime.now(timezone.utc)
    progress = []
    target = rest.download_checkpoint(exported.path, tmp_path, progress=lambda done, total: progress.append(done)) \
        .result(120)
    downloaded = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert downloaded == sorted(urls.urls)
    assert progress and progress == sorted(progress)
    with pytest.raises(ValueError):
        rest.get_external_weights_urls(run[1][0])  # a training checkpoint has no external URLs
