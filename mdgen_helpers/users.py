"""The user <-> label convention, decided once.

Folder `ID_k` is user id k (1-based, as users speak) and class label k-1 (0-based, as the model
sees it). Folders with other names are accepted in sorted order with an explicit mapping that
is saved with every artifact. The null (unconditional) label for guidance is `num_users`; the
model module owns that rule (`mdgen_helpers.dit.null_label`), this module only counts users.
Generated images are named after the 1-based user id (`image_name`, `parse_image_name`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mdgen_helpers.trust import safe_component

_ID_RE = re.compile(r"^ID_(\d+)$")
_IMAGE_NAME_RE = re.compile(r"^micro_doppler_user(\d+)_(\d+)\.png$")


@dataclass(frozen=True)
class UserMap:
    """Ordered user folders. Index in `folders` is the class label; `user_ids[label]` the 1-based id."""

    folders: tuple[str, ...]
    user_ids: tuple[int, ...] = field(default=())

    def __post_init__(self):
        if not self.folders:
            raise ValueError("UserMap needs at least one user folder")
        if not self.user_ids:
            object.__setattr__(self, "user_ids", tuple(default_user_id(f, i) for i, f in enumerate(self.folders)))
        if len(self.user_ids) != len(self.folders):
            raise ValueError("UserMap: folders and user_ids differ in length")
        if len(set(self.user_ids)) != len(self.user_ids):
            raise ValueError(f"UserMap: duplicate user ids {self.user_ids}")

    @classmethod
    def from_folders(cls, names) -> "UserMap":
        """Sort `ID_k` folders numerically (ID_2 before ID_10), others alphabetically after them."""
        names = list(names)
        numbered = sorted((n for n in names if _ID_RE.match(n)), key=lambda n: int(_ID_RE.match(n).group(1)))
        others = sorted(n for n in names if not _ID_RE.match(n))
        folders = tuple(numbered + others)
        ids: list[int] = [int(_ID_RE.match(n).group(1)) for n in numbered]
        nxt = max(ids, default=0) + 1
        for _ in others:
            ids.append(nxt)
            nxt += 1
        return cls(folders, tuple(ids))

    @property
    def num_users(self) -> int:
        return len(self.folders)

    def label_of_user(self, user_id: int) -> int:
        try:
            return self.user_ids.index(int(user_id))
        except ValueError:
            raise ValueError(
                f"user id {user_id} is not in this model/data set; known user ids: "
                f"{_compact(self.user_ids)}"
            ) from None

    def user_of_label(self, label: int) -> int:
        return self.user_ids[int(label)]

    def folder_of_label(self, label: int) -> str:
        return self.folders[int(label)]

    def label_of_folder(self, folder: str) -> int:
        try:
            return self.folders.index(folder)
        except ValueError:
            raise ValueError(f"folder {folder!r} is not a user folder of this data set; known: "
                             f"{_compact(self.folders)}") from None

    def folder_of_user(self, user_id: int) -> str:
        return self.folder_of_label(self.label_of_user(user_id))

    def label_of_image_name(self, name: str) -> int | None:
        """Label of a generated file `micro_doppler_userNN_KKK.png`; None for other names,
        ValueError for a user id this map does not have."""
        parsed = parse_image_name(name)
        return None if parsed is None else self.label_of_user(parsed[0])

    def to_json(self) -> dict[str, Any]:
        return {"folders": list(self.folders), "user_ids": list(self.user_ids)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "UserMap":
        # Folder names come from files others may have written: each must be one path component.
        return cls(tuple(safe_component(f, "user folder name") for f in obj["folders"]),
                   tuple(int(i) for i in obj["user_ids"]))


def image_name(user_id: int, sample_index: int) -> str:
    """File name of generated image `sample_index` (1-based) of user `user_id` (1-based)."""
    return f"micro_doppler_user{int(user_id):02d}_{int(sample_index):03d}.png"


def parse_image_name(name: str) -> tuple[int, int] | None:
    """(user_id, sample_index) of an `image_name`, or None for any other file name."""
    m = _IMAGE_NAME_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def default_user_id(folder: str, index: int) -> int:
    m = _ID_RE.match(folder)
    return int(m.group(1)) if m else index + 1


def _compact(ids) -> str:
    ids = list(ids)
    return ", ".join(map(str, ids)) if len(ids) <= 12 else f"{ids[0]}..{ids[-1]} ({len(ids)} users)"
