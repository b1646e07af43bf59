"""Models and their versions: accept an upload, say which version serves, pin one, delete, hand out artifacts.

Which version serves a name is decided here, in one place (`pick_serving`): the version an admin pinned, if any
(rollback: pin, and unpin to go back to the rule); else the newest ready version; else, while none is ready, the
oldest live one, serving its validated original: it is the one that served before the others were uploaded. So a
version that serves keeps serving until a newer one is ready: a new upload, still optimizing or failed, never
replaces it, however its inputs differ; and a version whose optimization failed serves its original when it was
already serving (a failed optimizer is not an outage) but replaces no other version (pin it to serve it).
A version whose job proved that ONNX Runtime cannot run the uploaded model at all (`unrunnable`) never serves, pinned
or not: predict gets 409 saying why and what to do, not a 400 per request as if the client's inputs were wrong.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Row, func, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import defer, load_only

from app.errors import ConflictError, NotFoundError, StorageError
from app.services.uploads import ValidatedUpload
from app.storage import ArtifactStore
from app.storage.base import CALIBRATION, OPTIMIZED, ORIGINAL, artifact_key, version_prefix
from app.store import Database, Job, ModelVersion, utcnow
from optimizer.pipeline import BASELINE

log = logging.getLogger("onnxforge.registry")

VARIANTS = ("optimized", "original")
PINNABLE = ("ready", "failed")  # a failed version serves its validated original
_VARIANT_FILES = {"optimized": OPTIMIZED, "original": ORIGINAL}


@dataclass(frozen=True)
class Accepted:
    name: str
    version: int
    job_id: str
    warnings: list[str]


def not_served(version: ModelVersion) -> str:
    """Why an unrunnable version is not served, and what to do: the one message of predict, report and pin."""
    return (f"model {version.name!r} version {version.version} is not served: its job failed because ONNX Runtime "
            f"cannot run the uploaded model ({version.error}). Upload a fixed model as {version.name!r} "
            f"(POST /v1/models), or pin another version to serve (PUT /v1/models/{version.name}/serving)")


def serving_variant(version: ModelVersion, requested: str | None) -> str:
    """The variant a request gets: what it asked for, else optimized once ready, else the original.

    A ready version whose optimizer kept the original (nothing beat it: `selected` is the baseline) serves and
    says "original" even when asked for "optimized": its optimized file is the original model, and an answer
    saying "optimized" would promise a speedup that was not found. A version whose optimization failed serves
    its validated original; asked for "optimized", it says why there is none.
    """
    if version.unrunnable:
        raise ConflictError(not_served(version))
    if version.status == "failed":
        if requested == "optimized":
            raise ConflictError(
                f"model {version.name!r} version {version.version} has no optimized variant: its optimization "
                f"failed ({version.error}). It serves its validated original: omit `variant` or ask for 'original'"
            )
        return "original"
    if requested in (None, "optimized") and version.status == "ready":
        return "original" if version.selected == BASELINE else "optimized"
    if requested == "optimized":
        raise ConflictError(
            f"model {version.name!r} version {version.version} is still optimizing: its optimized variant is not "
            "ready yet. Omit `variant` (or ask for 'original') to be served the validated original meanwhile"
        )
    return "original"


def interface_changes(old: ModelVersion, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> list[str]:
    """How `inputs`/`outputs` differ from `old`'s: names, dtypes and ranks (dimension sizes may change freely)."""
    changes = []
    for kind, before, after in (("input", old.inputs or [], inputs), ("output", old.outputs or [], outputs)):
        was = {t["name"]: t for t in before}
        now = {t["name"]: t for t in after}
        changes += [f"{kind} {n!r} is gone" for n in was if n not in now]
        changes += [f"{kind} {n!r} is new" for n in now if n not in was]
        for n in (n for n in now if n in was):
            if was[n].get("dtype") != now[n].get("dtype"):
                changes.append(f"{kind} {n!r} was {was[n].get('dtype')}, is {now[n].get('dtype')}")
            ranks = [None if t.get("shape") is None else len(t["shape"]) for t in (was[n], now[n])]
            if ranks[0] != ranks[1]:
                changes.append(f"{kind} {n!r} had rank {ranks[0]}, has {ranks[1]}")
    return changes


def pick_serving(versions: list[ModelVersion]) -> ModelVersion | None:
    """The pinned version; else the newest ready one; else (none ready) the oldest live one, which served first
    and keeps serving its validated original until a newer version is ready. None only when there is none.

    WHY the oldest and not the newest while none is ready: a version still optimizing or whose optimization
    failed must not take the name from the one serving (its clients would get 400s for an interface that
    changed under them, as the upload's warning promises they will not until the new version serves).
    An unrunnable version is never picked: None also when every live version is one.
    """
    versions = [v for v in versions if not v.unrunnable]
    pinned = [v for v in versions if v.pinned_at is not None and v.status in PINNABLE]
    if pinned:
        return max(pinned, key=lambda v: v.pinned_at)
    ready = [v for v in versions if v.status == "ready"]
    if ready:
        return max(ready, key=lambda v: v.version)
    live = [v for v in versions if v.status in ("optimizing", "failed")]
    return min(live, key=lambda v: v.version) if live else None


def pinned_version(versions: list[ModelVersion]) -> int | None:
    """The version pinned to serve, None when the automatic rule decides."""
    pinned = [v for v in versions if v.pinned_at is not None and v.status in PINNABLE and not v.unrunnable]
    return max(pinned, key=lambda v: v.pinned_at).version if pinned else None


class Registry:
    def __init__(self, db: Database, store: ArtifactStore) -> None:
        self.db = db
        self.store = store

    # -- writing ------------------------------------------------------------------------------------

    def accept(self, upload: ValidatedUpload, serving: dict[str, Any] | None = None) -> Accepted:
        """Store a validated upload as the name's next version and queue its optimization.

        The version row (with `serving`, its own batching settings), the job row and the artifacts
        appear together: the artifacts are moved in inside the transaction (after the version number
        is claimed by a flush), and removed again if it does not commit. No replica can therefore see
        the version without its serving settings and cache the default batching for it. Version
        numbers are never reused (deleted versions stay as rows).
        """
        for _ in range(5):  # two uploads racing for the same next version number: the loser retries
            try:
                return self._accept_once(upload, serving or None)
            except IntegrityError:
                continue
        raise ConflictError(f"too many concurrent uploads of {upload.name!r}; try again")

    def _accept_once(self, upload: ValidatedUpload, serving: dict[str, Any] | None) -> Accepted:
        stored_prefix: str | None = None
        try:
            with self.db.write() as session:
                last = session.scalar(select(func.max(ModelVersion.version)).where(ModelVersion.name == upload.name))
                warnings = self._interface_warnings(session, upload)
                version = ModelVersion(
                    name=upload.name, version=(last or 0) + 1, status="optimizing", filename=upload.filename,
                    sha256=upload.sha256, size_bytes=upload.size_bytes,
                    has_calibration=upload.calibration_path is not None, options=upload.options.to_dict(),
                    inputs=upload.inputs, outputs=upload.outputs, notes=[*upload.notes, *warnings], serving=serving,
                )
                session.add(version)
                session.flush()  # claims (name, version) now: a racing upload fails here, before any file moves
                job = Job(version_id=version.id, name=version.name, version=version.version)
                session.add(job)
                session.flush()
                stored_prefix = version_prefix(version.name, version.version)
                self.store.put_file(artifact_key(version.name, version.version, ORIGINAL), upload.model_path,
                                    move=True)
                if upload.calibration_path is not None:
                    self.store.put_file(artifact_key(version.name, version.version, CALIBRATION),
                                        upload.calibration_path, move=True)
                accepted = Accepted(version.name, version.version, job.id, warnings)
        except BaseException:
            if stored_prefix is not None:
                self.store.delete_prefix(stored_prefix)
            raise
        return accepted

    @staticmethod
    def _interface_warnings(session, upload: ValidatedUpload) -> list[str]:  # noqa: ANN001 - ORM Session
        """A warning when the upload's inputs/outputs differ from the version serving now: once the new one
        serves, requests written for the old interface get 400s. Accepted anyway (a deliberate change is fine)."""
        serving = pick_serving(list(session.scalars(select(ModelVersion).options(_WITHOUT_REPORT).where(
            ModelVersion.name == upload.name, ModelVersion.status != "deleted"))))
        if serving is None:
            return []
        changes = interface_changes(serving, upload.inputs, upload.outputs)
        if not changes:
            return []
        return [f"warning: the inputs/outputs differ from version {serving.version}, which serves now: "
                f"{'; '.join(changes)}. Once this version serves, requests written for version {serving.version} "
                "get 400s"]

    def delete(self, name: str, version: int | None = None) -> list[str]:
        """Delete a model (every version) or one version; returns the deleted version ids.

        Rows stay as tombstones (status "deleted"); their jobs, if still queued or running, are
        failed so the worker stops and discards its work.
        """
        with self.db.write() as session:
            query = select(ModelVersion).where(ModelVersion.name == name, ModelVersion.status != "deleted")
            if version is not None:
                query = query.where(ModelVersion.version == version)
            rows = session.scalars(query.with_for_update()).all()  # a pin racing this delete waits (PostgreSQL)
            if not rows:
                raise NotFoundError(_missing(name, version))
            if version is not None and rows[0].pinned_at is not None:
                raise ConflictError(
                    f"model {name!r} version {version} is pinned to serve: unpin it first "
                    f"(DELETE /v1/models/{name}/serving) or pin another version, then delete it"
                )
            deleted = _tombstone(session, rows)
        self._delete_files(deleted)
        return [row_id for row_id, _ in deleted]

    def retire_old(self, name: str, keep: int) -> list[tuple[str, int]]:
        """Delete `name`'s versions beyond its `keep` newest live ones (ONNXFORGE_KEEP_VERSIONS), except the one
        serving and the one pinned; returns the (id, version) of each one deleted, oldest first.

        WHY: versions replaced daily otherwise keep every upload's original, optimized file, calibration set and
        report forever (disk, database, the model's description). The serving and pinned versions are never
        removed, so a rollback target an admin chose stays, and so does the version clients get while a newer one
        optimizes.
        """
        if keep <= 0:
            return []
        with self.db.write() as session:
            rows = list(session.scalars(
                select(ModelVersion).options(load_only(*_SERVING_COLUMNS))
                .where(ModelVersion.name == name, ModelVersion.status != "deleted")
                .order_by(ModelVersion.version.desc()).with_for_update()
            ))
            serving = pick_serving(rows)
            kept = {id(row) for row in rows[:keep]} | {id(serving)}
            old = [row for row in reversed(rows) if id(row) not in kept and row.pinned_at is None]
            deleted = _tombstone(session, old) if old else []
        for _, (row_name, row_version) in deleted:
            try:
                self.store.delete_prefix(version_prefix(row_name, row_version))
            except StorageError as exc:  # the upload that triggered this succeeded: say it in the log, not to it
                log.error("model %r version %d was deleted (ONNXFORGE_KEEP_VERSIONS) but its files stayed: %s",
                          row_name, row_version, exc)
        return [(row_id, number) for row_id, (_, number) in deleted]

    def retire_all(self, keep: int) -> dict[str, list[tuple[str, int]]]:
        """`retire_old` for every model with more than `keep` live versions (at start, so that a new setting
        applies to models nobody uploads to any more); returns what each lost."""
        if keep <= 0:
            return {}
        with self.db.read() as session:
            crowded = list(session.scalars(
                select(ModelVersion.name).where(ModelVersion.status != "deleted").group_by(ModelVersion.name)
                .having(func.count() > keep).order_by(ModelVersion.name)
            ))
        retired = {name: self.retire_old(name, keep) for name in crowded}
        return {name: gone for name, gone in retired.items() if gone}

    def _delete_files(self, deleted: list[tuple[str, tuple[str, int]]]) -> None:
        for _, (row_name, row_version) in deleted:
            self.store.delete_prefix(version_prefix(row_name, row_version))

    def pin(self, name: str, version: int | None) -> list[ModelVersion]:
        """Pin `version` to serve `name` whatever is newer (rollback), or unpin (None: back to the automatic
        rule); returns the live versions after the change.

        Only a ready version or a failed one (it serves its validated original) can be pinned: one still
        optimizing would be replaced under the pin by its own job's outcome. The pin is a column of the version
        rows, so every replica reads it with the version list it caches (no read per request).
        """
        now = utcnow()
        with self.db.write() as session:
            rows = list(session.scalars(
                select(ModelVersion).where(ModelVersion.name == name, ModelVersion.status != "deleted")
                .order_by(ModelVersion.version).with_for_update()
            ))
            if not rows:
                raise NotFoundError(_missing(name, None))
            target = next((row for row in rows if row.version == version), None)
            if version is not None:
                if target is None:
                    raise NotFoundError(f"{_missing(name, version)} to pin (deleted, or never uploaded): its live "
                                        f"versions are {[row.version for row in rows]}")
                if target.unrunnable:
                    raise ConflictError(not_served(target))
                if target.status not in PINNABLE:
                    raise ConflictError(
                        f"model {name!r} version {version} is still optimizing: pin it once its job has finished "
                        "(ready, or failed: it then serves its validated original)"
                    )
            for row in rows:
                row.pinned_at = now if row is target else None
        return rows

    # -- reading ------------------------------------------------------------------------------------

    def versions(self, name: str) -> list[ModelVersion]:
        """Every live version of a model, oldest first; NotFoundError if there is none."""
        with self.db.read() as session:
            rows = list(session.scalars(
                select(ModelVersion).options(_WITHOUT_REPORT)
                .where(ModelVersion.name == name, ModelVersion.status != "deleted").order_by(ModelVersion.version)
            ))
        if not rows:
            raise NotFoundError(_missing(name, None))
        return rows

    def names(self, after: str | None = None, limit: int | None = None) -> tuple[dict[str, list[Row]], bool]:
        """Models in name order (those after `after`, at most `limit`) with their live versions, oldest first, and
        whether more models follow.

        The versions are plain rows of the columns that say which version serves (`_SERVING_COLUMNS`), read as
        ModelVersion attributes are. WHY: each ready version's report is ~14 KB of JSON; loading whole versions
        made GET /v1/models take 5.5 s and the API process grow to 690 MiB with 500 models x 20 versions.
        """
        live = ModelVersion.status != "deleted"
        with self.db.read() as session:
            page = select(ModelVersion.name).where(live).group_by(ModelVersion.name).order_by(ModelVersion.name)
            if after is not None:
                page = page.where(ModelVersion.name > after)
            if limit is not None:
                page = page.limit(limit + 1)
            names = list(session.scalars(page))
            more = limit is not None and len(names) > limit
            names = names[:limit] if limit is not None else names
            rows = session.execute(
                select(*_SERVING_COLUMNS).where(live, ModelVersion.name.in_(names))
                .order_by(ModelVersion.name, ModelVersion.version)
            ).all() if names else []
        models: dict[str, list[Row]] = {}
        for row in rows:
            models.setdefault(row.name, []).append(row)
        return models, more

    def live(self, versions: set[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which of `versions` (name, version) are not deleted: /metrics drops the series of the others, deleted
        here or through another replica."""
        if not versions:
            return set()
        with self.db.read() as session:
            rows = session.execute(select(ModelVersion.name, ModelVersion.version).where(
                tuple_(ModelVersion.name, ModelVersion.version).in_(list(versions)), ModelVersion.status != "deleted"))
            return {(name, version) for name, version in rows}

    def jobs_of(self, version_ids: list[str]) -> dict[str, Job]:
        """The latest job of each version."""
        with self.db.read() as session:
            jobs = session.scalars(select(Job).where(Job.version_id.in_(version_ids)).order_by(Job.created_at)).all()
        return {job.version_id: job for job in jobs}

    def resolve(self, name: str, version: int | None = None) -> ModelVersion:
        """The version a request for `name` (and maybe `version`) is about; ConflictError (409, why and what to do)
        when no version of `name` can serve: each live one is unrunnable."""
        if version is not None:
            with self.db.read() as session:
                row = session.scalars(select(ModelVersion).options(_WITHOUT_REPORT).where(
                    ModelVersion.name == name, ModelVersion.version == version, ModelVersion.status != "deleted",
                )).first()
            if row is None:
                raise NotFoundError(_missing(name, version))
            return row
        versions = self.versions(name)  # NotFoundError if there is none
        serving = pick_serving(versions)
        if serving is None:  # every live version is unrunnable: say why the newest is not served
            raise ConflictError(not_served(versions[-1]))
        return serving

    def report(self, name: str, version: int | None = None) -> tuple[ModelVersion, dict[str, Any]]:
        row = self.resolve(name, version)
        if row.unrunnable:
            raise ConflictError(not_served(row))
        if row.status == "failed":
            raise ConflictError(
                f"model {name!r} version {row.version} has no report: its optimization failed ({row.error}). "
                "It serves its validated original"
            )
        with self.db.read() as session:
            report = session.scalar(select(ModelVersion.report).where(ModelVersion.id == row.id))
        if row.status != "ready" or report is None:
            job = self.jobs_of([row.id]).get(row.id)
            state = "queued" if job is not None and job.status == "queued" else "still running"
            raise ConflictError(
                f"model {name!r} version {row.version} has no report yet: its optimization is {state}"
                + (f" ({job.error})" if job is not None and job.error else "")
            )
        return row, report

    def artifact(self, name: str, version: int | None, variant: str | None) -> tuple[ModelVersion, str, Path]:
        """A local path to a version's ONNX file: `variant` optimized | original, None for the one that serves.

        The same choice as predict's (serving_variant): where the optimizer kept the original, "optimized" is the
        original file as stored at upload (the bytes whose sha256 the version shows), not the optimizer's copy.
        """
        row = self.resolve(name, version)
        chosen = serving_variant(row, variant)
        return row, chosen, self.model_file(row, chosen)

    def model_file(self, row: ModelVersion, variant: str) -> Path:
        try:
            return self.store.fetch(artifact_key(row.name, row.version, _VARIANT_FILES[variant]))
        except FileNotFoundError:
            raise NotFoundError(
                f"the {variant} file of model {row.name!r} version {row.version} is gone (deleted meanwhile?)"
            ) from None


# What pick_serving, pinned_version and serving_variant read: lists load these columns only.
_SERVING_COLUMNS = (ModelVersion.id, ModelVersion.name, ModelVersion.version, ModelVersion.status,
                    ModelVersion.selected, ModelVersion.pinned_at, ModelVersion.unrunnable, ModelVersion.error)


# Versions are read without their report (~14 KB of JSON each, read by `report` alone). WHY: predict resolves a name
# by reading all its live versions every registry_cache_ttl_s; with 400 versions that took 530 ms with reports.
# Reading `report` on such a row raises (it is not loaded): ask Registry.report.
_WITHOUT_REPORT = defer(ModelVersion.report, raiseload=True)


def _tombstone(session, rows: list[ModelVersion]) -> list[tuple[str, tuple[str, int]]]:  # noqa: ANN001 - ORM Session
    """Mark `rows` deleted (they stay: version numbers are never reused) and stop their jobs; returns each one's
    (id, (name, version)), whose files the caller removes once the transaction has committed."""
    now = utcnow()
    ids = [row.id for row in rows]
    for row in rows:
        row.status, row.deleted_at, row.report, row.pinned_at = "deleted", now, None, None
    session.execute(update(Job).where(Job.version_id.in_(ids), Job.status.in_(("queued", "running"))).values(
        status="failed", finished_at=now, lease_expires_at=None, error="the model version was deleted",
    ))
    return [(row.id, (row.name, row.version)) for row in rows]


def _missing(name: str, version: int | None) -> str:
    return f"no model {name!r}" if version is None else f"model {name!r} has no version {version}"

