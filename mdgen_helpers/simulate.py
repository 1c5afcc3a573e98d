"""Physics-based simulator of human-gait radar micro-Doppler, written as a data set like the real one.

Pipeline per image (all numpy, vectorised over time):

1. Kinematics: the Boulic-Thalmann global walking model (Boulic, Magnenat-Thalmann & Thalmann,
   "A global human walking model with real-time kinematic personification", The Visual Computer 6,
   1990; used by V.C. Chen, "The Micro-Doppler Effect in Radar", 2011). Height H gives segment
   lengths and leg length Ht; speed V gives the relative velocity RV = V/Ht, the relative cycle
   length RLc = 1.346 sqrt(RV), the cycle duration Dc = RLc/RV seconds (NOT RLc/(RV*Ht), which is
   the ~13% too-slow cadence of a public port) and the support duration Ds = 0.752 Dc - 0.143.
   Joint trajectories are periodic functions of the cycle phase: Boulic's sinusoids for the pelvis
   translations/rotations and shoulders, his control points through a periodic monotone cubic
   (PCHIP) for hip, knee, ankle, elbow and thorax. They are evaluated at the radar PRF itself, so
   nothing aliases (a 100 Hz kinematic rate would, at 24 GHz).
2. Identity: every user draws, besides H and V, a stride factor, arm-swing gain, knee/hip gains,
   a stance-fraction shift, torso bounce/sway gains, left/right asymmetry and RCS build factors.
3. Radar: 3-5 point scatterers per body segment with RCS weights, slow amplitude fading and a
   random sub-wavelength phase each; complex baseband s(t) = sum_i a_i / R_i^2 exp(-j 4 pi R_i / lambda)
   plus static clutter (optional high-pass) and complex white noise at a drawn level below the
   torso peak.
4. Rendering: STFT with exactly `n_time` columns over `duration_s`, Hamming window, zero padding
   to `n_doppler` bins, dB clipped to a fixed dynamic range, a colour scaling (gamma) along the jet
   colormap, approaching (positive Doppler) at the top. The PRF is 4 v_max / lambda, so the axis
   spans +-v_max without aliasing and row r maps to velocity `v_max - r * (v_max - v_min) / (n_doppler - 1)`
   (see users.json "radar").

A style (`SIM_STYLES`: "default" at 24 GHz, "mmwave" at 77 GHz) names the radar and noise level of
step 3-4 together; the people of steps 1-2 depend on the seed only, so two styles of one seed show
the same users rendered differently.

Every random draw comes from a numpy Generator seeded by (seed, user id, sample index), so the
bytes written do not depend on the number of worker processes.
"""

from __future__ import annotations

import io
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from mdgen_helpers.errors import MdgenError
from mdgen_helpers.files import atomic_write_bytes, atomic_write_json, read_json

SIMULATOR_VERSION = 1
SUPPORTED_CARRIERS_GHZ = (5.8, 24.0, 77.0)
SPEED_OF_LIGHT = 299_792_458.0


# ----------------------------------------------------------------------------------------------
# Configuration and per-user / per-sample parameters
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RadarConfig:
    """Radar and rendering settings; defaults are the recommended ones (24 GHz, +-5 m/s, 4 s)."""

    carrier_ghz: float = 24.0
    v_span_mps: float = 5.0  # the Doppler axis covers [-v_span, +v_span) m/s; PRF = 4 v_span / lambda
    duration_s: float = 4.0
    n_time: int = 256  # STFT columns (image width)
    n_doppler: int = 256  # FFT size after zero padding (image height)
    window: str = "hamming"
    window_len: int = 128  # samples per STFT frame (80 ms at 24 GHz), zero padded to n_doppler
    db_range: float = 50.0  # dB below the image maximum that map to the bottom of the colormap
    colormap: str = "jet"
    # colour scaling along the colormap: entry = level ** color_gamma, level in [0, 1] linear in dB
    # (0 at -db_range, 1 at the maximum); < 1 lifts weak returns towards the warm colours
    color_gamma: float = 1.0
    radar_height_m: float = 1.0
    clutter_highpass: bool = False  # DC-notch (MTI) filter on the baseband before the STFT
    highpass_cutoff_mps: float = 0.05
    jpeg_quality: int = 95

    @property
    def wavelength_m(self) -> float:
        return SPEED_OF_LIGHT / (self.carrier_ghz * 1e9)

    @property
    def prf_hz(self) -> float:
        return 4.0 * self.v_span_mps / self.wavelength_m

    @property
    def n_samples(self) -> int:
        return int(round(self.duration_s * self.prf_hz))

    @property
    def velocity_per_row(self) -> float:
        return self.prf_hz / self.n_doppler * self.wavelength_m / 2.0

    def frame_starts(self) -> np.ndarray:
        return np.round(np.linspace(0, self.n_samples - self.window_len, self.n_time)).astype(np.int64)

    def validate(self) -> None:
        if self.carrier_ghz <= 0 or self.v_span_mps <= 0 or self.duration_s <= 0:
            raise MdgenError("radar: carrier_ghz, v_span_mps and duration_s must be positive")
        if self.window_len > self.n_doppler or self.window_len < 8:
            raise MdgenError(f"radar: window_len must be in [8, n_doppler={self.n_doppler}], got {self.window_len}")
        if self.n_samples < self.window_len + self.n_time:
            raise MdgenError("radar: duration_s too short for n_time STFT columns at this PRF")
        if self.window not in ("hamming", "hann"):
            raise MdgenError(f"radar: window must be 'hamming' or 'hann', got {self.window!r}")
        if not (self.db_range > 0 and self.color_gamma > 0):
            raise MdgenError(f"radar: db_range and color_gamma must be positive, got {self.db_range} and {self.color_gamma}")

    def to_json(self) -> dict:
        """The settings plus everything a reader needs to map an image row/column to physics."""
        dv = self.velocity_per_row
        starts = self.frame_starts()
        d = asdict(self)
        d.update(
            carrier_hz=self.carrier_ghz * 1e9,
            wavelength_m=self.wavelength_m,
            prf_hz=self.prf_hz,
            n_samples=self.n_samples,
            nfft=self.n_doppler,
            velocity_per_row=dv,
            v_max=(self.n_doppler // 2 - 1) * dv,  # velocity at the centre of row 0 (top)
            v_min=-(self.n_doppler // 2) * dv,  # velocity at the centre of the bottom row
            row_order="row 0 = most positive (approaching) velocity",
            column_dt_s=float((starts[1] - starts[0]) / self.prf_hz) if self.n_time > 1 else self.duration_s,
            column_t0_s=float((starts[0] + self.window_len / 2) / self.prf_hz),
            column_t1_s=float((starts[-1] + self.window_len / 2) / self.prf_hz),
            db_reference="image maximum",
        )
        return d


@dataclass(frozen=True)
class UserParams:
    """Ground truth of one simulated person (what makes them recognisable)."""

    user_id: int
    height_m: float
    speed_mps: float
    stride_factor: float  # multiplies Boulic's relative cycle length (longer strides, lower cadence)
    arm_swing: float  # gain on shoulder flexion amplitude (0 = arms hang still)
    elbow_gain: float
    hip_gain: float
    knee_gain: float
    stance_shift: float  # added to the relative duration of support
    bounce: float  # gain on vertical torso translation
    sway: float  # gain on lateral torso translation and pelvis roll
    asymmetry: float  # left leg amplitude is (1 - asymmetry) x the right one
    asym_phase: float  # left leg phase offset from half a cycle (fraction of a cycle)
    rcs_torso: float
    rcs_limbs: float

    def gait(self) -> dict:
        return gait_timing(self.height_m, self.speed_mps, self.stride_factor, self.stance_shift)

    def to_json(self) -> dict:
        d = asdict(self)
        g = self.gait()
        d.update(
            leg_length_m=g["leg_length_m"],
            relative_velocity=g["rv"],
            cadence_hz=g["cadence_hz"],
            step_rate_hz=2.0 * g["cadence_hz"],
            stride_length_m=g["stride_length_m"],
            support_fraction=g["support_fraction"],
        )
        return d


@dataclass(frozen=True)
class NuisanceRanges:
    """Per-sample variation ranges (the same person never walks twice the same way)."""

    speed_jitter: float = 0.03  # std of the relative speed change
    cadence_jitter: float = 0.03  # std of the relative cadence change
    stride_jitter: float = 0.02  # std of the stride-to-stride cadence variation
    aspect_deg: tuple[float, float] = (-15.0, 15.0)
    start_range_m: tuple[float, float] = (8.0, 14.0)
    noise_below_torso_db: tuple[float, float] = (35.0, 50.0)
    clutter_re_torso_db: tuple[float, float] = (-25.0, -5.0)
    fading_depth: tuple[float, float] = (0.1, 0.4)


@dataclass(frozen=True)
class SimStyle:
    """A named rendering of the same people: the radar (carrier, window, dB range, colour scaling)
    and the per-recording noise level it comes with. Users are drawn from the seed alone (every
    style keeps the +-5 m/s axis the users are checked against), so a style changes pixels, never who
    walks; the style's radar goes to users.json, which is how every reader follows it."""

    radar: RadarConfig = RadarConfig()
    nuisances: NuisanceRanges = NuisanceRanges()


SIM_STYLES: dict[str, SimStyle] = {
    # 24 GHz K-band, 80 ms Hamming frames, 50 dB linear along jet, noise 35-50 dB below the torso.
    "default": SimStyle(),
    # 77 GHz automotive radar: 25 ms Hann frames (same +-5 m/s axis and 0.08 m/s resolution, 3.2x
    # the PRF: limb traces split into finer lines), a 40 dB range lifted by gamma 0.7 along jet (weak
    # returns in cyan rather than blue) and a receiver 5 dB noisier (30-45 dB below the torso).
    # Chosen as different but not poorer: the colormap stand-in reconstructs it at 21.9 dB PSNR
    # (24.9 dB default; a 25-40 dB noise floor with gamma 0.6 fell to 19.5 dB: mostly speckle).
    "mmwave": SimStyle(RadarConfig(carrier_ghz=77.0, window="hann", db_range=40.0, color_gamma=0.7),
                       NuisanceRanges(noise_below_torso_db=(30.0, 45.0))),
}


def get_style(name: str) -> SimStyle:
    """The named simulator style; an unknown name is a one-line error listing the known ones."""
    if name not in SIM_STYLES:
        raise MdgenError(f"unknown simulator style {name!r}; choose one of {sorted(SIM_STYLES)}")
    return SIM_STYLES[name]


# User parameter ranges: (low, high). Wide enough to separate 31 people, narrow enough that every
# foot stays inside +-5 m/s at 24 GHz.
USER_RANGES: dict[str, tuple[float, float]] = {
    "height_m": (1.55, 1.95),
    "speed_mps": (0.6, 1.4),  # truncated above by the toe-speed check in draw_users
    "stride_factor": (0.88, 1.12),
    "arm_swing": (0.5, 1.7),
    "elbow_gain": (0.6, 1.4),
    "hip_gain": (0.85, 1.15),
    "knee_gain": (0.8, 1.2),
    "stance_shift": (-0.04, 0.04),
    "bounce": (0.6, 1.6),
    "sway": (0.5, 1.5),
    "asymmetry": (0.0, 0.12),
    "asym_phase": (-0.03, 0.03),
    "rcs_torso": (0.7, 1.4),
    "rcs_limbs": (0.7, 1.4),
}
LOW_ARM_SWING_FRACTION = 0.1  # a few users barely swing their arms
MIN_USER_DISTANCE = 0.35
MAX_JITTER = 0.1  # per-sample speed and cadence changes are clipped to +-10%  # in range-normalised parameter units; closer users are redrawn


def peak_limb_speed(user: UserParams, speed_mps: float | None = None, cadence_scale: float = 1.0) -> float:
    """Fastest forward velocity of any joint (the toe in swing), m/s, over one steady gait cycle."""
    speed = user.speed_mps if speed_mps is None else speed_mps
    g = gait_timing(user.height_m, speed, user.stride_factor, user.stance_shift)
    n = 512
    dt = g["cycle_s"] / cadence_scale / n
    phase = np.arange(n) / n
    joints = body_joints(user, phase, speed * dt * np.arange(n), g["rv"], g["support_fraction"])
    return float(np.max(np.abs(np.diff(joints[..., 0], axis=0)) / dt))


def draw_users(num_users: int, seed: int, v_limit_mps: float = 0.93 * RadarConfig.v_span_mps) -> list[UserParams]:
    """Draw `num_users` distinct people; a draw too close to an earlier user is redrawn, and so is
    one whose toes would outrun the Doppler axis (`v_limit_mps`) at the fastest speed jitter."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0FFEE]))
    keys = list(USER_RANGES)
    lo = np.array([USER_RANGES[k][0] for k in keys])
    hi = np.array([USER_RANGES[k][1] for k in keys])
    arm = keys.index("arm_swing")
    chosen: list[np.ndarray] = []
    for _ in range(num_users):
        for attempt in range(1000):
            u = rng.uniform(0.0, 1.0, size=len(keys))
            v = lo + u * (hi - lo)
            if rng.uniform() < LOW_ARM_SWING_FRACTION:
                v[arm] = rng.uniform(0.0, 0.12)
            z = (v - lo) / (hi - lo)
            trial = UserParams(user_id=0, **dict(zip(keys, map(float, v))))
            if peak_limb_speed(trial, trial.speed_mps * (1 + MAX_JITTER), 1 + MAX_JITTER) > v_limit_mps and attempt < 999:
                continue
            if all(np.linalg.norm(z - c) >= MIN_USER_DISTANCE for c in chosen) or attempt == 999:
                chosen.append(z)
                break
    users = []
    for i, z in enumerate(chosen):
        v = lo + z * (hi - lo)
        users.append(UserParams(user_id=i + 1, **{k: round(float(x), 6) for k, x in zip(keys, v)}))
    return users


# ----------------------------------------------------------------------------------------------
# Boulic-Thalmann kinematics
# ----------------------------------------------------------------------------------------------

# Segment lengths as fractions of body height (Boulic / Chen; arms from Winter's anthropometry).
SEGMENTS = {
    "head": 0.130,
    "shoulder_half": 0.259 / 2,
    "torso": 0.288,
    "hip_half": 0.191 / 2,
    "upper_leg": 0.245,
    "lower_leg": 0.246,
    "foot": 0.143,
    "upper_arm": 0.186,
    "lower_arm": 0.146,
    "hand": 0.108,
}


def gait_timing(height_m: float, speed_mps: float, stride_factor: float = 1.0, stance_shift: float = 0.0) -> dict:
    """Boulic's spatio-temporal normalisation: leg length, RV, cycle, stride and support duration."""
    ht = (SEGMENTS["upper_leg"] + SEGMENTS["lower_leg"]) * height_m
    rv = speed_mps / ht  # relative velocity, leg lengths per second
    if not 0.05 <= rv <= 3.0:
        raise MdgenError(f"walking model: relative velocity {rv:.2f} outside Boulic's range (0, 3]; "
                         f"use 0.05*Ht..3*Ht m/s for height {height_m} m")
    rlc = 1.346 * math.sqrt(rv) * stride_factor  # relative length of a cycle (in leg lengths)
    dc = rlc / rv  # cycle duration in seconds (leg lengths / (leg lengths per second))
    ds = 0.752 * dc - 0.143  # duration of support
    support = min(max(ds / dc + stance_shift, 0.5), 0.75)
    return {
        "leg_length_m": ht,
        "rv": rv,
        "cycle_s": dc,
        "cadence_hz": 1.0 / dc,
        "stride_length_m": rlc * ht,
        "support_fraction": support,
    }


def _gait_class(rv: float) -> str:
    return "a" if rv < 0.5 else ("b" if rv < 1.3 else "c")


def _control_points(rv: float, dsr: float) -> dict[str, tuple[list[float], list[float]]]:
    """Boulic's control points (phase in [0,1), degrees) for the joints he gives as curves."""
    g = _gait_class(rv)
    c = (rv - 1.3) / 1.7  # interpolation between gait b (c=0) and the fastest walk (c=1)
    if g == "a":
        hip = ([0.5, 0.9], [-30 * rv, 50 * rv])
        knee = ([0.17, 0.4, 0.75, 1.0], [3, 3, 140 * rv, 3])
        ankle = ([0.0, 0.08, 0.5, dsr, 0.85], [-3, -30 * rv - 3, 22 * rv - 3, -34 * rv - 3, -3])
        elbow = ([0.05, 0.5, 0.9], [6 * rv + 3, 34 * rv + 3, 10 * rv + 3])
    elif g == "b":
        hip = ([0.5, 0.9], [-15, 25])
        knee = ([0.17, 0.4, 0.75, 1.0], [3, 3, 70, 3])
        ankle = ([0.0, 0.08, 0.5, dsr, 0.85], [-3, -18, 8, -20, -3])
        b = (rv - 0.5) / 0.8
        elbow = ([0.05, 0.01 * b + 0.5, 0.9], [8 * b + 6, 24 * b + 20, 9 * b + 8])
    else:
        x1 = 0.2 * c - 0.1
        hip = ([x1 % 1.0, 0.5, 0.9], [5 * c + 25, -15, 6 * c + 25])
        knee = ([-0.05 * c + 0.17, 0.4, -0.05 * c + 0.75, -0.03 * c + 1.0], [22 * c + 3, 3, -5 * c + 70, 3 * c + 3])
        ankle = ([0.0, 0.08, -0.1 * c + 0.5, dsr, 0.85], [5 * c - 3, 4 * c - 18, -3 * c + 8, -8 * c - 20, 5 * c - 3])
        elbow = ([0.05, 0.04 * c + 0.51, -0.1 * c + 0.9], [-6 * c + 14, 26 * c + 44, -6 * c + 17])
    thorax = ([0.1, 0.4, 0.6, 0.9], [4 / 3 * rv, -4.5 / 3 * rv, -4 / 3 * rv, 4.5 / 3 * rv])
    return {"hip": hip, "knee": knee, "ankle": ankle, "elbow": elbow, "thorax": thorax}


def _periodic_curve(xs, ys, grid: np.ndarray) -> np.ndarray:
    """Periodic monotone cubic through control points (phase mod 1), sampled on `grid`."""
    from scipy.interpolate import PchipInterpolator

    xs = np.mod(np.asarray(xs, dtype=float), 1.0)
    ys = np.asarray(ys, dtype=float)
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    keep = np.concatenate([[True], np.diff(xs) > 1e-9])  # a point at 0 and 1 is the same point
    xs, ys = xs[keep], ys[keep]
    x3 = np.concatenate([xs - 1, xs, xs + 1])
    y3 = np.concatenate([ys, ys, ys])
    return PchipInterpolator(x3, y3)(grid)


_GRID = np.linspace(0.0, 1.0, 512, endpoint=False)


def _at(curve: np.ndarray, phase: np.ndarray) -> np.ndarray:
    return np.interp(np.mod(phase, 1.0), _GRID, curve, period=1.0)


def _gain(curve: np.ndarray, gain: float) -> np.ndarray:
    """Scale a joint curve's excursion about its mean (style gains keep the posture)."""
    m = curve.mean()
    return m + gain * (curve - m)


def _rot_z(v: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.stack([c * v[..., 0] - s * v[..., 1], s * v[..., 0] + c * v[..., 1], v[..., 2]], axis=-1)


def _sagittal(angle_rad: np.ndarray, length: float, down: bool = True) -> np.ndarray:
    """Vector of a segment rotated by `angle` in the body's sagittal plane (forward positive).

    down=True: a hanging segment (thigh, shank, arm); down=False: a forward-pointing one (foot).
    """
    z = np.zeros_like(angle_rad)
    if down:
        return np.stack([length * np.sin(angle_rad), z, -length * np.cos(angle_rad)], axis=-1)
    return np.stack([length * np.cos(angle_rad), z, length * np.sin(angle_rad)], axis=-1)


JOINTS = ["pelvis", "neck", "head", "l_shoulder", "r_shoulder", "l_elbow", "r_elbow", "l_wrist", "r_wrist",
          "l_hand", "r_hand", "l_hip", "r_hip", "l_knee", "r_knee", "l_ankle", "r_ankle", "l_heel", "r_heel", "l_toe", "r_toe"]
J = {name: i for i, name in enumerate(JOINTS)}


def body_joints(user: UserParams, phase: np.ndarray, forward_m: np.ndarray, rv: float, dsr: float) -> np.ndarray:
    """Joint positions (T, 21, 3) in the walker's frame: x forward, y left, z up, ground at z=0.

    `phase` is the gait-cycle phase (right heel strike at integer values), `forward_m` the distance
    walked. Legs and arms of the left side run half a cycle (plus the user's asymmetry) later.
    """
    H = user.height_m
    L = {k: v * H for k, v in SEGMENTS.items()}
    ht = L["upper_leg"] + L["lower_leg"]
    cp = _control_points(rv, dsr)
    curves = {k: _periodic_curve(xs, ys, _GRID) for k, (xs, ys) in cp.items()}
    hip_c = _gain(curves["hip"], user.hip_gain)
    knee_c = np.maximum(_gain(curves["knee"], user.knee_gain), 0.0)
    ankle_c = curves["ankle"]
    elbow_c = np.maximum(_gain(curves["elbow"], user.elbow_gain), 0.0)
    deg = np.pi / 180.0
    p = phase
    p_left = phase + 0.5 + user.asym_phase

    # Pelvis (origin of the spine): Boulic's translations, in leg lengths, scaled to metres.
    av = 0.015 * rv * user.bounce
    vert = (-av + av * np.sin(2 * np.pi * (2 * p - 0.35))) * ht
    al = (-0.128 * rv**2 + 0.128 * rv) if rv < 0.5 else 0.032
    lat = al * user.sway * np.sin(2 * np.pi * (p - 0.1)) * ht
    aa = (-0.084 * rv**2 + 0.084 * rv) if rv < 0.5 else -0.021
    fb = aa * np.sin(2 * np.pi * (2 * p + 2 * (0.625 - dsr))) * ht
    a_tilt = (-8 * rv**2 + 8 * rv) if rv < 0.5 else 2.0
    tilt = (-a_tilt + a_tilt * np.sin(2 * np.pi * (2 * p - 0.1))) * deg  # forward/back rotation
    roll = 1.66 * rv * user.sway * np.sin(2 * np.pi * p) * deg  # pelvis falls on the swing side
    yaw = -4.0 * rv * np.cos(2 * np.pi * p) * deg  # pelvis torsion
    thorax_yaw = _at(curves["thorax"], p) * deg

    T = phase.shape[0]
    out = np.zeros((T, len(JOINTS), 3))
    pelvis = np.stack([forward_m + fb, lat, ht + vert], axis=-1)
    out[:, J["pelvis"]] = pelvis

    # Torso and head: the spine tilts forward/back and rolls with the pelvis.
    spine = np.stack([np.sin(tilt), -np.sin(roll), np.cos(tilt) * np.cos(roll)], axis=-1)
    neck = pelvis + L["torso"] * spine
    out[:, J["neck"]] = neck
    out[:, J["head"]] = neck + L["head"] * spine

    # Legs: hip flexion (forward positive), knee flexion (shank back), ankle dorsiflexion.
    for side, ph, amp, sign in (("r", p, 1.0, -1.0), ("l", p_left, 1.0 - user.asymmetry, 1.0)):
        hip_off = _rot_z(np.broadcast_to([0.0, sign * L["hip_half"], 0.0], (T, 3)), yaw)
        hip = pelvis + hip_off
        a_thigh = (hip_c.mean() + amp * (_at(hip_c, ph) - hip_c.mean())) * deg
        a_shank = a_thigh - amp * _at(knee_c, ph) * deg
        a_foot = a_shank + _at(ankle_c, ph) * deg
        knee = hip + _rot_z(_sagittal(a_thigh, L["upper_leg"]), yaw)
        ankle = knee + _rot_z(_sagittal(a_shank, L["lower_leg"]), yaw)
        foot = _rot_z(_sagittal(a_foot, L["foot"], down=False), yaw)  # heel to toe
        out[:, J[f"{side}_hip"]], out[:, J[f"{side}_knee"]] = hip, knee
        out[:, J[f"{side}_ankle"]] = ankle
        out[:, J[f"{side}_heel"]] = ankle - 0.25 * foot  # the ankle sits a quarter foot from the heel
        out[:, J[f"{side}_toe"]] = ankle + 0.75 * foot

    # Arms: each arm swings opposite to its leg; the thorax twists against the pelvis.
    ash = 9.88 * rv * user.arm_swing
    for side, ph, sign in (("r", p, -1.0), ("l", p_left, 1.0)):
        shoulder = neck + _rot_z(np.broadcast_to([0.0, sign * L["shoulder_half"], -0.02 * H], (T, 3)), thorax_yaw)
        a_upper = (3.0 - ash / 2 - ash * np.cos(2 * np.pi * ph)) * deg
        a_lower = a_upper + _at(elbow_c, ph) * deg
        elbow = shoulder + _rot_z(_sagittal(a_upper, L["upper_arm"]), thorax_yaw)
        wrist = elbow + _rot_z(_sagittal(a_lower, L["lower_arm"]), thorax_yaw)
        hand = wrist + _rot_z(_sagittal(a_lower, L["hand"]), thorax_yaw)
        out[:, J[f"{side}_shoulder"]], out[:, J[f"{side}_elbow"]] = shoulder, elbow
        out[:, J[f"{side}_wrist"]], out[:, J[f"{side}_hand"]] = wrist, hand
    return out


# Point scatterers: (segment start joint, end joint, fractions along it, RCS share, group).
# A segment is 3-5 points, so its Doppler trace is a filled band, not a thin line.
_SCATTERER_LAYOUT = [
    ("neck", "head", (0.3, 0.65, 1.0), 0.06, "head"),
    ("pelvis", "neck", (0.1, 0.3, 0.5, 0.7, 0.9), 0.60, "torso"),
    ("l_shoulder", "r_shoulder", (0.15, 0.5, 0.85), 0.06, "torso"),
    ("l_hip", "r_hip", (0.1, 0.5, 0.9), 0.10, "torso"),
]
for _s in ("l", "r"):
    _SCATTERER_LAYOUT += [
        (f"{_s}_shoulder", f"{_s}_elbow", (0.2, 0.5, 0.8), 0.07, "arm"),
        (f"{_s}_elbow", f"{_s}_wrist", (0.2, 0.5, 0.85), 0.07, "arm"),
        (f"{_s}_wrist", f"{_s}_hand", (0.2, 0.6, 1.0), 0.04, "arm"),
        (f"{_s}_hip", f"{_s}_knee", (0.15, 0.4, 0.65, 0.9), 0.12, "leg"),
        (f"{_s}_knee", f"{_s}_ankle", (0.15, 0.4, 0.65, 0.9), 0.07, "leg"),
        (f"{_s}_heel", f"{_s}_toe", (0.1, 0.5, 0.9), 0.03, "leg"),
    ]


def scatterer_table(user: UserParams):
    """Start/end joint indices, fractions, RCS (m^2) and torso-width offsets of every scatterer."""
    si, ei, fr, rcs, off = [], [], [], [], []
    for a, b, fracs, share, group in _SCATTERER_LAYOUT:
        gain = user.rcs_torso if group in ("torso", "head") else user.rcs_limbs
        for k, f in enumerate(fracs):
            si.append(J[a])
            ei.append(J[b])
            fr.append(f)
            rcs.append(share * gain / len(fracs))
            # The torso is ~30 cm wide: spread its points left/right so its band has width.
            w = (0.08 * user.height_m * (-1) ** k) if (a, b) == ("pelvis", "neck") else 0.0
            off.append(w)
    return np.array(si), np.array(ei), np.array(fr), np.array(rcs), np.array(off)


# ----------------------------------------------------------------------------------------------
# One sample: kinematics at the PRF -> baseband -> STFT -> image
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleNuisance:
    start_phase: float
    speed_scale: float
    cadence_scale: float
    aspect_deg: float
    start_range_m: float
    noise_below_torso_db: float
    clutter_re_torso_db: float
    fading_depth: float


def draw_nuisance(rng: np.random.Generator, ranges: NuisanceRanges = NuisanceRanges()) -> SampleNuisance:
    return SampleNuisance(
        start_phase=float(rng.uniform(0, 1)),
        speed_scale=float(1 + np.clip(rng.normal(0, ranges.speed_jitter), -MAX_JITTER, MAX_JITTER)),
        cadence_scale=float(1 + np.clip(rng.normal(0, ranges.cadence_jitter), -MAX_JITTER, MAX_JITTER)),
        aspect_deg=float(rng.uniform(*ranges.aspect_deg)),
        start_range_m=float(rng.uniform(*ranges.start_range_m)),
        noise_below_torso_db=float(rng.uniform(*ranges.noise_below_torso_db)),
        clutter_re_torso_db=float(rng.uniform(*ranges.clutter_re_torso_db)),
        fading_depth=float(rng.uniform(*ranges.fading_depth)),
    )


def _window(radar: RadarConfig) -> np.ndarray:
    return np.hamming(radar.window_len) if radar.window == "hamming" else np.hanning(radar.window_len)


def stft_power(x: np.ndarray, radar: RadarConfig) -> np.ndarray:
    """|STFT|^2 as an image: (n_doppler, n_time), row 0 = most positive (approaching) velocity."""
    idx = radar.frame_starts()[:, None] + np.arange(radar.window_len)
    frames = x[idx] * _window(radar)
    spec = np.fft.fftshift(np.fft.fft(frames, n=radar.n_doppler, axis=1), axes=1)
    return (np.abs(spec) ** 2)[:, ::-1].T


def _smooth_noise(rng: np.random.Generator, n_series: int, n_knots: int, n_out: int) -> np.ndarray:
    """Slowly varying zero-mean unit-ish random series (linear interpolation of random knots)."""
    knots = rng.normal(0.0, 1.0, size=(n_series, n_knots + 1)).astype(np.float32)
    pos = np.linspace(0, n_knots, n_out)
    i0 = np.minimum(pos.astype(np.int64), n_knots - 1)
    f = (pos - i0).astype(np.float32)
    return knots[:, i0] * (1 - f) + knots[:, i0 + 1] * f


def simulate_signal(user: UserParams, radar: RadarConfig, rng: np.random.Generator, nuisance: SampleNuisance,
                    ranges: NuisanceRanges = NuisanceRanges()):
    """Complex baseband of the walker alone (T,), plus the truth needed to check the image."""
    n = radar.n_samples
    speed = user.speed_mps * nuisance.speed_scale
    g = gait_timing(user.height_m, speed, user.stride_factor, user.stance_shift)
    cadence = g["cadence_hz"] * nuisance.cadence_scale
    stride_len = speed / cadence
    # Stride-to-stride timing variation: the cadence wanders smoothly, stride by stride.
    n_strides = int(math.ceil(radar.duration_s * cadence)) + 1
    wander = 1.0 + ranges.stride_jitter * _smooth_noise(rng, 1, n_strides, n)[0]
    inst_cadence = cadence * wander
    phase = nuisance.start_phase + np.cumsum(inst_cadence) / radar.prf_hz
    forward = np.cumsum(inst_cadence * stride_len) / radar.prf_hz  # speed follows the cadence
    joints = body_joints(user, phase, forward, g["rv"], g["support_fraction"])

    si, ei, fr, rcs, off = scatterer_table(user)
    # Place the walker: start at range R0 on the radar's x axis, walking towards the radar with
    # the drawn aspect angle between the walking direction and the line of sight. The 21 joints
    # are moved (not the ~60 scatterers), then everything per scatterer runs in float32, which
    # keeps ~1e-6 m range precision (1e-3 rad of phase at 24 GHz).
    heading = np.pi - np.deg2rad(nuisance.aspect_deg)
    joints = _rot_z(joints, heading)
    joints[..., 0] += nuisance.start_range_m
    joints[..., 2] -= radar.radar_height_m
    joints = joints.astype(np.float32)
    start = joints[:, si]
    pts = start + fr.astype(np.float32)[None, :, None] * (joints[:, ei] - start)
    pts[..., 0] += (-np.sin(heading) * off).astype(np.float32)  # torso width, across the body
    pts[..., 1] += (np.cos(heading) * off).astype(np.float32)
    r = np.sqrt(np.einsum("tsk,tsk->ts", pts, pts))  # (T, S) range to the radar

    fading = 1.0 + nuisance.fading_depth * _smooth_noise(rng, len(rcs), 12, n).T
    psi = rng.uniform(0, 2 * np.pi, size=len(rcs))  # sub-wavelength position inside the segment
    amp = np.sqrt(rcs).astype(np.float32)[None, :] * np.abs(fading) / r**2
    # Two-way phase relative to the start range (a constant phase, invisible in |STFT|): the
    # arguments stay small enough (< ~1e4 rad) for float32 trig.
    k = np.float32(4 * np.pi / radar.wavelength_m)
    phase = psi.astype(np.float32)[None, :] - k * (r - np.float32(nuisance.start_range_m))
    sig = (amp * np.cos(phase)).sum(axis=1, dtype=np.float64) + 1j * (amp * np.sin(phase)).sum(axis=1, dtype=np.float64)

    torso_pts = (si == J["pelvis"]) & (ei == J["neck"])
    torso_r = r[:, torso_pts].mean(axis=1)
    torso_v = -np.gradient(torso_r) * radar.prf_hz  # approaching = positive
    truth = {
        "speed_mps": speed,
        "aspect_deg": nuisance.aspect_deg,
        "cadence_hz": cadence,
        "step_rate_hz": 2 * cadence,
        "torso_radial_mps": float(np.mean(torso_v)),
        "max_radial_mps": float(np.max(np.abs(np.diff(r, axis=0))) * radar.prf_hz),
    }
    return sig, truth


def simulate_power(user: UserParams, radar: RadarConfig, seed_seq, ranges: NuisanceRanges = NuisanceRanges(),
                   **overrides):
    """Spectrogram power (n_doppler, n_time) of one walk, with noise and clutter, plus its truth.

    `overrides` replace drawn nuisances by name (e.g. aspect_deg=0.0), for controlled tests.
    """
    rng = np.random.default_rng(seed_seq)
    nuisance = replace(draw_nuisance(rng, ranges), **overrides)
    sig, truth = simulate_signal(user, radar, rng, nuisance, ranges)
    n = radar.n_samples
    w = _window(radar)

    # Calibrate clutter and noise against the torso peak of the body-only spectrogram.
    body = stft_power(sig, radar)
    torso_peak = float(np.median(body.max(axis=0)))
    clutter_amp = math.sqrt(torso_peak * 10 ** (nuisance.clutter_re_torso_db / 10)) / w.sum()
    t = np.arange(n) / radar.prf_hz
    clutter = clutter_amp * np.exp(1j * rng.uniform(0, 2 * np.pi)) * (
        1.0 + 0.03 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t + rng.uniform(0, 2 * np.pi)))
    sigma = math.sqrt(torso_peak / (np.sum(w**2) * 10 ** (nuisance.noise_below_torso_db / 10)))
    noise = sigma * (rng.standard_normal(n) + 1j * rng.standard_normal(n)) / math.sqrt(2)
    x = sig + clutter + noise
    if radar.clutter_highpass:
        from scipy.signal import lfilter

        fc = 2 * radar.highpass_cutoff_mps / radar.wavelength_m
        alpha = math.exp(-2 * np.pi * fc / radar.prf_hz)
        x = lfilter([1.0, -1.0], [1.0, -alpha], x)
    truth.update({k: v for k, v in asdict(nuisance).items() if k not in truth})
    return stft_power(x, radar), truth


_JET_LUT: np.ndarray | None = None


def colormap_lut(name: str = "jet") -> np.ndarray:
    """(256, 3) uint8 lookup table of matplotlib's colormap (jet by default)."""
    global _JET_LUT
    if name == "jet" and _JET_LUT is not None:
        return _JET_LUT
    from matplotlib import colormaps

    lut = np.round(colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)
    if name == "jet":
        _JET_LUT = lut
    return lut


def render(power: np.ndarray, radar: RadarConfig) -> np.ndarray:
    """Power -> dB re the image maximum, clipped to `db_range`, scaled by `color_gamma`, through the
    colormap: uint8 (H, W, 3). `physics.image_to_power` is the inverse."""
    db = 10 * np.log10(power + 1e-30)
    db = np.clip(db - db.max(), -radar.db_range, 0.0)
    level = (db + radar.db_range) / radar.db_range
    if radar.color_gamma != 1.0:
        level = level ** radar.color_gamma
    idx = np.round(level * 255).astype(np.int64)
    return colormap_lut(radar.colormap)[idx]


def sample_seed(seed: int, user_id: int, index: int) -> np.random.SeedSequence:
    """Per-image seed: a pure function of (seed, user, index), independent of worker count."""
    return np.random.SeedSequence([int(seed), int(user_id), int(index), 0x5EED])


def simulate_image(user: UserParams, radar: RadarConfig, seed: int, index: int,
                   ranges: NuisanceRanges = NuisanceRanges(), **overrides):
    """One RGB spectrogram (uint8, (n_doppler, n_time, 3)) and its per-sample truth."""
    power, truth = simulate_power(user, radar, sample_seed(seed, user.user_id, index), ranges, **overrides)
    return render(power, radar), truth


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Data set writer
# ----------------------------------------------------------------------------------------------


def _write_one(job) -> str:
    out_dir, user, radar, ranges, seed, index = job
    rgb, _ = simulate_image(user, radar, seed, index, ranges)
    rel = f"ID_{user.user_id}/ID_{user.user_id}_{index:04d}.jpg"
    atomic_write_bytes(Path(out_dir) / rel, encode_jpeg(rgb, radar.jpeg_quality))
    return rel


def _check_out_dir(out_dir: Path, manifest: dict) -> None:
    """Refuse to mix into a folder that holds something else (nothing already there is lost)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise MdgenError(f"simulate: --out {out_dir} exists and is not a folder; choose another path")
    entries = [p for p in out_dir.iterdir() if not p.name.startswith(".")]
    if not entries:
        return
    users_json = out_dir / "users.json"
    if users_json.exists():
        try:
            old = read_json(users_json)
        except (OSError, ValueError):
            old = None
        keys = ("radar", "nuisances", "style", "seed", "per_user", "num_users", "version")
        wanted = json.loads(json.dumps({k: manifest[k] for k in keys}))  # as read back (tuples -> lists)
        same = old is not None and all(old.get(k) == wanted[k] for k in keys)
        if same:
            return  # re-running the same command rewrites identical bytes
    raise MdgenError(f"simulate: --out {out_dir} is not empty and was not written by this same simulate "
                     f"command (users.json differs or is missing); choose an empty or new folder")


def simulate_dataset(out_dir, num_users: int, per_user: int, seed: int = 0, radar: RadarConfig | None = None,
                     workers: int | None = None, progress: bool = True, style: str = "default") -> Path:
    """Write out_dir/ID_k/ID_k_NNNN.jpg for k=1..num_users and out_dir/users.json (written last).

    `style` (SIM_STYLES) sets the radar and noise level; `radar`, when given, replaces the style's
    radar. Same arguments, same bytes, whatever the number of workers.
    """
    if num_users < 1 or per_user < 1:
        raise MdgenError(f"simulate: need --users >= 1 and --per-user >= 1, got {num_users} and {per_user}")
    look = get_style(style)
    radar = look.radar if radar is None else radar
    radar.validate()
    out_dir = Path(out_dir)
    users = draw_users(num_users, seed, 0.93 * radar.v_span_mps)
    manifest = {
        "version": SIMULATOR_VERSION,
        "generator": "mdgen_helpers.simulate (Boulic-Thalmann walker, point scatterers, STFT)",
        "seed": int(seed),
        "num_users": int(num_users),
        "per_user": int(per_user),
        "style": style,
        "radar": radar.to_json(),
        "nuisances": asdict(look.nuisances),
        "image": {"format": "jpeg", "quality": radar.jpeg_quality, "size": [radar.n_doppler, radar.n_time],
                  "layout": "ID_k/ID_k_NNNN.jpg"},
        "users": {str(u.user_id): u.to_json() for u in users},
    }
    _check_out_dir(out_dir, manifest)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out_dir), u, radar, look.nuisances, int(seed), i) for u in users for i in range(per_user)]
    workers = max(1, min(int(workers or os.cpu_count() or 1), len(jobs)))

    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="simulate", unit="img", disable=not progress)
    if workers == 1:
        for job in jobs:
            _write_one(job)
            bar.update(1)
    else:
        # spawn: safe even when the parent process has torch threads running.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for _ in pool.map(_write_one, jobs, chunksize=max(1, min(32, len(jobs) // (4 * workers)))):
                bar.update(1)
    bar.close()
    atomic_write_json(out_dir / "users.json", manifest)
    return out_dir


# ----------------------------------------------------------------------------------------------
# Preview figure
# ----------------------------------------------------------------------------------------------


def save_preview_figure(data_dir, out_png, users=(1, 2, 3, 4), per_user: int = 3) -> Path:
    """A labelled grid (users x samples) of a simulated data set, with physical axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    data_dir = Path(data_dir)
    meta = read_json(data_dir / "users.json")
    rd = meta["radar"]
    users = [u for u in users if str(u) in meta["users"]]
    if not users:
        raise MdgenError(f"preview: none of the requested users are in {data_dir / 'users.json'}")
    fig, axes = plt.subplots(len(users), per_user, figsize=(2.6 * per_user, 2.5 * len(users)), squeeze=False)
    extent = [rd["column_t0_s"], rd["column_t1_s"], rd["v_min"], rd["v_max"]]
    for r, uid in enumerate(users):
        info = meta["users"][str(uid)]
        files = sorted((data_dir / f"ID_{uid}").glob("*.jpg"))[:per_user]
        for c in range(per_user):
            ax = axes[r, c]
            if c < len(files):
                ax.imshow(np.asarray(Image.open(files[c]).convert("RGB")), extent=extent, aspect="auto")
            ax.tick_params(labelsize=6)
            if c == 0:
                ax.set_ylabel(f"ID_{uid}\nvelocity (m/s)", fontsize=7)
            if r == len(users) - 1:
                ax.set_xlabel("time (s)", fontsize=7)
            if c == 0 or r == 0:
                ax.set_title(f"H={info['height_m']:.2f} m V={info['speed_mps']:.2f} m/s\n"
                             f"steps={info['step_rate_hz']:.2f} Hz arm={info['arm_swing']:.2f}", fontsize=6)
    fig.suptitle(f"Simulated users, style {meta.get('style', 'default')} ({rd['carrier_ghz']:g} GHz, PRF "
                 f"{rd['prf_hz']:.0f} Hz, {rd['db_range']:g} dB, gamma {rd.get('color_gamma', 1.0):g}, "
                 f"{rd['colormap']})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    plt.close(fig)
    return atomic_write_bytes(out_png, buf.getvalue())


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_cli_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output folder (new or empty): ID_k/*.jpg + users.json")
    parser.add_argument("--users", type=int, default=31, help="number of simulated people (default 31)")
    parser.add_argument("--per-user", type=int, default=150, help="spectrograms per person (default 150)")
    parser.add_argument("--seed", type=int, default=0, help="seed: same seed, same bytes (default 0)")
    parser.add_argument("--style", default="default",
                        help=f"rendering style, one of {sorted(SIM_STYLES)}: radar carrier, window, dB range, colour "
                             "scaling and noise level (the same users for the same seed; default: default, 24 GHz)")
    parser.add_argument("--carrier-ghz", type=float, default=None, choices=SUPPORTED_CARRIERS_GHZ,
                        help="radar carrier frequency in GHz (default: the style's)")
    parser.add_argument("--highpass", action="store_true", help="remove static clutter with a DC-notch filter")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all CPU cores)")
    parser.add_argument("--preview", default=None, help="also write a labelled preview PNG to this path")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def cli_main(args) -> int:
    if args.workers is not None and args.workers < 1:
        raise MdgenError("simulate: --workers must be >= 1")
    radar = get_style(args.style).radar
    if args.carrier_ghz is not None:
        radar = replace(radar, carrier_ghz=float(args.carrier_ghz))
    radar = replace(radar, clutter_highpass=bool(args.highpass))
    out = simulate_dataset(args.out, args.users, args.per_user, args.seed, radar=radar, workers=args.workers,
                           progress=not args.no_progress, style=args.style)
    print(f"wrote {args.users} x {args.per_user} spectrograms and users.json to {out}")
    if args.preview:
        save_preview_figure(out, args.preview, users=tuple(range(1, min(args.users, 4) + 1)), per_user=3)
        print(f"preview: {args.preview}")
    return 0
