"""``molmo-edge run BUNDLE``: drive a robot with a bundle, through the safety layer, at a fixed rate.

\b
Examples:
  molmo-edge run bundle/ --robot so101 --port /dev/ttyACM0 --camera front=/dev/video0 \\
      --camera wrist=/dev/video2 --task "put the cube in the bowl" --duration 60
  molmo-edge run bundle/ --robot yam --can can0 --camera front=/dev/video0 --task "wipe the table"
  molmo-edge run bundle/ --robot sim-so101 --task "pick up the red cube" --telemetry run.jsonl
  molmo-edge run --policy ws://gpu-box:8000 --robot so101 --port /dev/ttyACM0 --camera front=/dev/video0

The rate, the joint frame, the camera names and the steps executed per chunk come from the
bundle's robot contract; a flag that disagrees is refused unless --override-contract is given
(printed, and recorded in the telemetry). Everything checkable without motion is checked
before the bus opens (``runtimes.preflight``); the first move is a slow approach or a refusal
(``runtimes.first_move``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from molmoact2_edge.contract import RobotContract
from molmoact2_edge.errors import CameraError, ContractError, DependencyError, FirstMoveError, MolmoEdgeError
from molmoact2_edge.runtimes.bundle import Bundle
from molmoact2_edge.runtimes.first_move import FirstMoveConfig
from molmoact2_edge.viz.progress import RunProgress

log = logging.getLogger(__name__)

SIM_TASKS = ("touch", "lift", "place")  # sim.tasks.TASKS (not imported: the sim extra may be absent)
DEFAULT_SIM_TASK = "touch"  # the bundled checkpoint's task; run, demo and eval agree

ROBOTS = ("so101", "koch", "yam", "bimanual-yam", "sim-so101")
ROBOT_TYPES = {
    "so101": "so101_follower",
    "koch": "koch_follower",
    "yam": "yam",
    "bimanual-yam": "bimanual_yam",
    "sim-so101": "so101_follower",
}


def parse_cameras(specs: tuple[str, ...]) -> dict[str, str]:
    """``name=device`` pairs -> {name: device}; a device is /dev/videoN, an index, or a video file to replay."""
    cameras: dict[str, str] = {}
    for spec in specs:
        name, sep, device = spec.partition("=")
        if not sep or not name or not device:
            raise CameraError(f"--camera {spec!r}: expected NAME=DEVICE, e.g. front=/dev/video0")
        if name in cameras:
            raise CameraError(f"--camera {name} given twice")
        cameras[name] = device
    return cameras


def open_cameras(specs: dict[str, str], fps: float) -> dict[str, Any]:
    """Camera objects: a video file replays in real time, anything else is opened with OpenCV."""
    from molmoact2_edge.hardware.cameras import OpenCVCamera, ReplayCamera

    cameras: dict[str, Any] = {}
    for name, device in specs.items():
        if Path(device).suffix.lower() in (".mp4", ".mkv", ".avi", ".webm"):
            cameras[name] = ReplayCamera(name, Path(device), fps=fps)
        else:
            cameras[name] = OpenCVCamera(name, int(device) if device.isdigit() else device, fps=fps)
    return cameras


@dataclass
class RunSettings:
    """What one ``run`` invocation does, gathered from the options."""

    bundle: Path | Bundle | None  # None: --policy names a server; an opened Bundle is not hashed again
    robot: str
    task: str | None  # None: the target's own instruction (the simulator's task)
    backend: str = "auto"
    duration_s: float | None = None
    episodes: int = 1
    hz: float = 30.0  # the contract's (``preflight.resolve_run``)
    swap_threshold: float = 0.5
    record: Path | None = None
    telemetry: Path | None = None
    on_exit: str = "hold"
    stall_timeout_s: float = 2.0
    joint_frame: str = "lerobot"  # what the robot presents (recorded datasets say so)
    first_move_limit: float = FirstMoveConfig.max_fraction  # of each joint's range (``runtimes.first_move``)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # contract values overridden by flags
    policy_url: str | None = None  # ws:// or wss:// of a `molmo-edge serve`
    api_key_file: Path | None = None
    tls_ca: Path | None = None
    display: str | None = None  # rerun: auto | viewer | serve (viz/rerun_display.py)
    save_rrd: Path | None = None  # rerun recording file
    video_dir: Path | None = None  # one MP4 per episode (sim only: needs the robot's cameras)
    policy: Any = None  # an already connected RemotePolicy (the CLI opens it for pre-flight)
    rtc: str = "auto"  # real-time chunking: auto uses it when the bundle's flow graph takes a prefix
    refused_first_move: str = "stop"  # or "next": a failed episode, then on (sim success-rate benchmarks)


@dataclass
class EpisodeTarget:
    """The robot one episode drives, with its success check, instruction and cleanup (sim: a fresh scene)."""

    robot: Any
    success: Callable[[], bool] | None = None
    instruction: str | None = None
    close: Callable[[], None] | None = None


def open_contract(
    bundle: Path | None, policy_url: str | None, api_key_file: Path | None, tls_ca: Path | None, timeout_s: float
) -> tuple[Bundle | None, Any, RobotContract]:
    """(opened bundle, connected remote policy, the robot contract): the bundle's hashes are checked here, once;
    a remote server sends its contract on connect. Both come before anything touches the robot."""
    if bundle is not None:
        opened = Bundle.open(bundle)
        return opened, None, opened.contract
    from molmoact2_edge.serving.auth import load_api_key
    from molmoact2_edge.serving.remote import RemotePolicy

    assert policy_url is not None
    remote = RemotePolicy(policy_url, load_api_key(api_key_file), ca_file=tls_ca, timeout_s=timeout_s, reconnect_s=timeout_s)
    sent = remote.contract.get("robot_contract")
    if sent is None:
        remote.close()
        raise ContractError(f"{policy_url}: the server sent no robot contract; run the same molmoact2-edge version on both sides")
    return None, remote, RobotContract.from_dict(sent, f"{policy_url} robot contract")


def open_policy(settings: RunSettings) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(policy, its robot contract, its description): a local PolicySession, or a RemotePolicy for ws:// URLs.

    Both have ``act``/``reset``/``close``; a remote one gives up after the stall timeout without a reply.
    """
    if settings.policy is not None:
        return settings.policy, settings.policy.contract, settings.policy.describe()
    if settings.policy_url is None:
        from molmoact2_edge.runtimes.session import PolicySession
        from molmoact2_edge.serving.contract import policy_contract

        session = PolicySession(settings.bundle, settings.backend, rtc=settings.rtc)  # type: ignore[arg-type]
        if settings.task:
            try:
                session.check_task(settings.task)
            except BaseException:
                session.close()
                raise
        return session, policy_contract(session.bundle), session.backend.describe()
    try:
        from molmoact2_edge.serving.remote import RemotePolicy
    except ImportError as err:
        raise DependencyError(f"--policy ws:// needs websockets ({err}): pip install 'molmoact2-edge[serve]'") from err
    from molmoact2_edge.serving.auth import load_api_key

    remote = RemotePolicy(
        settings.policy_url,
        load_api_key(settings.api_key_file),
        ca_file=settings.tls_ca,
        timeout_s=settings.stall_timeout_s,
        reconnect_s=settings.stall_timeout_s,
    )
    return remote, remote.contract, remote.describe()


def run_policy(
    settings: RunSettings,
    open_episode: Callable[[int], EpisodeTarget],
    finish: Callable[[], None] | None = None,
    observers: Sequence[Callable[[Mapping[str, Any]], None]] = (),
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Load the bundle once, then run ``settings.episodes`` episodes; (episode summaries, telemetry summary).

    open_episode(i): the target of episode i (connected here if it is not yet); its ``close`` runs
    after the episode. finish: runs once at the end (a real robot's disconnect). observers: see every
    telemetry record as it is written (live progress).
    Each episode gets its own SafetyLayer: it starts from the measured pose and ends with the torque policy.
    """
    from molmoact2_edge.hardware.safety import SafetyConfig, SafetyLayer
    from molmoact2_edge.runtimes.control import EpisodeResult, LoopConfig, run_episode, summarize
    from molmoact2_edge.runtimes.first_move import first_move
    from molmoact2_edge.runtimes.power import PowerMonitor, detect_power_sampler
    from molmoact2_edge.runtimes.recording import DatasetRecorder
    from molmoact2_edge.runtimes.telemetry import Telemetry
    from molmoact2_edge.serving.contract import check_robot

    session, contract, described = open_policy(settings)
    monitor = PowerMonitor(detect_power_sampler()).start()
    meta = {
        "backend": described,
        "robot": settings.robot,
        "task": settings.task,
        "contract": {"hz": settings.hz, "joint_frame": settings.joint_frame, "overrides": settings.overrides},
    }
    display = open_display(settings.display, settings.save_rrd)
    watchers = [*observers, *([display] if display is not None else [])]
    telemetry = Telemetry(settings.telemetry, control_hz=settings.hz, power=monitor, meta=meta, observers=watchers)
    videos = EpisodeVideos(settings.video_dir, settings.hz, telemetry.observers)
    recorder: DatasetRecorder | None = None
    results: list[dict[str, Any]] = []
    try:
        for episode in range(settings.episodes):
            target = open_episode(episode)
            try:
                robot = target.robot
                hz = None if "hz" in settings.overrides else settings.hz  # an override was printed and recorded
                check_robot(contract, list(robot.cameras), robot.joint_names, hz)  # before the bus opens
                if not robot.is_connected:
                    robot.connect()
                if settings.record is not None and recorder is None:
                    recorder = DatasetRecorder(
                        settings.record,
                        int(settings.hz),
                        robot.joint_names,
                        ROBOT_TYPES[settings.robot],
                        joint_frame=settings.joint_frame,
                    )
                task = settings.task or target.instruction
                if not task:
                    raise MolmoEdgeError('no task: pass --task "<instruction>"')
                config = LoopConfig(
                    task, settings.hz, settings.swap_threshold, settings.duration_s, settings.stall_timeout_s,
                    rtc=getattr(session, "rtc", None) not in (None, "off"),  # a remote policy takes no prefix
                )  # fmt: skip
                session.reset()
                telemetry.begin_episode(episode, joint_names=list(robot.joint_names), task=task)
                with SafetyLayer(robot, SafetyConfig(on_exit=settings.on_exit, control_hz=settings.hz)) as layer:  # type: ignore[arg-type]
                    telemetry.write({"type": "safety", "episode": episode, **layer.telemetry()})
                    videos.begin(episode, robot, layer)
                    guard = FirstMoveConfig(settings.first_move_limit, likely_cause=first_move_cause(settings))
                    try:
                        moved = first_move(session.act, layer, task, settings.hz, guard)
                    except FirstMoveError as err:
                        if settings.refused_first_move != "next":
                            raise
                        # the arm was not moved: a failed episode for a success-rate count, and on to the next
                        telemetry.write({"type": "first_move", "episode": episode, "refused": str(err)})
                        result = EpisodeResult("first_move_refused", error=str(err))
                    else:
                        telemetry.write({"type": "first_move", "episode": episode, **moved})
                        gate = display.watch(layer) if display is not None else layer
                        result = run_episode(session.act, gate, config, telemetry, target.success, recorder)
                    summary = {
                        "episode": episode,
                        "task": task,
                        **summarize(result),
                        "safety": layer.telemetry(),
                    }
            finally:
                if target.close is not None:
                    target.close()
            telemetry.write({"type": "episode", **summary})
            summary["video"] = videos.end(summary["success"])
            results.append(summary)
            if recorder is not None:
                recorder.end_episode(keep=True)
            if result.end in ("interrupted", "error"):
                break
    finally:
        if finish is not None:
            finish()
        period_errors_ms = [e * 1e3 for e in telemetry.loop.errors_s]
        stats = telemetry.close()
        stats["period_errors_ms"] = period_errors_ms
        stats["power_trace"] = monitor.trace()
        monitor.stop()
        session.close()
        if display is not None:
            display.close()
        if recorder is not None and results:
            recorder.finalize()
    return results, stats


def first_move_cause(settings: RunSettings) -> str:
    """What most likely put the first target far away, for the first-move error."""
    if "joint_frame" in settings.overrides:
        o = settings.overrides["joint_frame"]
        return (
            f"the joint frame: the bundle's policy was trained in {o['contract']} but --override-contract ran it "
            f"in {o['used']}; drop --joint-frame"
        )
    return f"the calibration of the arm (or a policy trained in another joint frame than {settings.joint_frame})"


def open_display(mode: str | None, save_rrd: Path | None) -> Any:
    """The rerun display/recording asked for (``--display``, ``--save-rrd``), or None (rerun-sdk is imported only then)."""
    if mode is None and save_rrd is None:
        return None
    from molmoact2_edge.viz.rerun_display import RerunDisplay, open_instructions, resolve_mode

    display = RerunDisplay.open(mode, save_rrd)
    if mode is not None and resolve_mode(mode) == "serve":
        click.echo(open_instructions(), err=True)
    return display


class EpisodeVideos:
    """One MP4 per episode (camera beside commanded vs actual joints) when ``video_dir`` is set."""

    def __init__(self, video_dir: Path | None, hz: float, observers: list[Any]) -> None:
        self.video_dir, self.hz, self.observers = video_dir, hz, observers
        self.collector: Any = None

    def begin(self, episode: int, robot: Any, layer: Any) -> None:
        if self.video_dir is None or not robot.cameras:
            return
        from molmoact2_edge.viz.episode_video import EpisodeFrames, TickFrameCollector

        camera = next(iter(robot.cameras.values()))
        frames = EpisodeFrames(robot.joint_names, layer.lower, layer.upper, self.hz)
        self.collector = TickFrameCollector(episode, frames, lambda: camera.read_latest().rgb)
        self.observers.append(self.collector)

    def end(self, success: bool) -> str | None:
        if self.collector is None:
            return None
        from molmoact2_edge.viz.episode_video import write_episode_video

        collector, self.collector = self.collector, None
        self.observers.remove(collector)
        assert self.video_dir is not None
        outcome = "success" if success else "failure"
        path = write_episode_video(collector.data, self.video_dir / f"episode_{collector.episode:03d}_{outcome}.mp4")
        return str(path) if path is not None else None


def sim_episodes(
    sim_task: str, size: int, hz: float, joint_frame: str = "lerobot"
) -> Callable[[int], EpisodeTarget]:
    """Episode i on a fresh simulated SO-101 scene seeded with i, reached through the Feetech driver."""
    from molmoact2_edge.sim.robot import make_sim_so101

    def open_episode(i: int) -> EpisodeTarget:
        handle = make_sim_so101(sim_task, seed=i, size=size, control_hz=hz, joint_frame=joint_frame)
        return EpisodeTarget(handle.robot, handle.success, handle.instruction, handle.close)

    return open_episode


def make_hardware_robot(
    kind: str,
    port: str | None,
    can: tuple[str, ...],
    cameras: dict[str, Any],
    robot_id: str,
    joint_frame: str = "lerobot",
) -> Any:
    """A real robot from ``hardware.robots.make_robot`` with the command line's bus and cameras."""
    from molmoact2_edge.hardware.robots import make_robot

    if kind == "so101":
        return make_robot(kind, port=port, cameras=cameras, robot_id=robot_id, joint_frame=joint_frame)
    if kind == "koch":
        return make_robot(kind, port=port, cameras=cameras, robot_id=robot_id)
    if kind == "yam":
        return make_robot(kind, channel=can[0], cameras=cameras)
    if len(can) != 2:
        raise MolmoEdgeError(f"--robot bimanual-yam needs two --can channels (left, right), got {list(can)}")
    return make_robot(kind, left_channel=can[0], right_channel=can[1], cameras=cameras)


def hardware_episodes(robot: Any) -> tuple[Callable[[int], EpisodeTarget], Callable[[], None]]:
    """(open_episode, finish) for a real robot: the same robot every episode, disconnected at the end."""
    return (lambda i: EpisodeTarget(robot)), robot.disconnect


def display_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--display [auto|viewer|serve]`` and ``--save-rrd FILE`` (run, demo)."""
    command = click.option(
        "--save-rrd",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Write a rerun recording of the run (cameras, joints, chunks, latency, power) to this .rrd file.",
    )(command)
    return click.option(
        "--display",
        type=click.Choice(["auto", "viewer", "serve"]),
        is_flag=False,
        flag_value="auto",
        default=None,
        help="Stream the run to rerun (pip install 'molmoact2-edge[display]'): viewer = a native viewer on this "
        "machine; serve = for a headless robot computer, a web viewer other machines open (the command is "
        "printed); --display alone = viewer when this machine has a screen, else serve.",
    )(command)


def print_summary(results: list[dict[str, Any]], stats: dict[str, Any]) -> None:
    for r in results:
        click.echo(
            f"episode {r['episode']}: {r['end']} after {r['duration_s']:.1f} s, {r['ticks']} ticks, "
            f"{r['chunks']} chunks, {r['held_ticks']} held; safety clipped {r['safety'].get('clipped_step', 0)} steps"
        )
    if stats:
        t = stats
        stages = ", ".join(
            f"{k} {v['p50']:.1f}" for k, v in t["stages_ms"].items() if v.get("count") and v["p50"] > 0
        )
        err = t["loop"]["period_error_ms"]
        click.echo(f"latency p50 ms: {stages}")
        if err.get("count"):
            click.echo(
                f"loop period error ms: p50 {err['p50']:.2f}, p99 {err['p99']:.2f}, max {err['max']:.2f}"
            )
        power = t["power"]
        if power.get("available"):
            click.echo(f"energy per chunk J: p50 {power['energy_per_chunk_j'].get('p50', float('nan')):.3f}")
        else:
            click.echo(f"power: unavailable ({power.get('reason', 'no sampler')})")


@click.command("run")
@click.argument("bundle", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--policy", "policy_url", help="ws://HOST:PORT or wss://HOST:PORT of a `molmo-edge serve`, instead of BUNDLE.")
@click.option(
    "--api-key-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="--policy: file holding the server's API key (default: $MOLMO_EDGE_API_KEY).",
)
@click.option(
    "--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="--policy wss://: CA of a self-signed server."
)
@click.option("--robot", type=click.Choice(ROBOTS), required=True, help="Which robot to drive.")
@click.option("--port", help="Serial port of an SO-101 bus adapter (e.g. /dev/ttyACM0).")
@click.option("--can", multiple=True, help="CAN channel(s) of a YAM (two for bimanual-yam).")
@click.option(
    "--camera", "cameras", multiple=True, help="NAME=DEVICE, repeatable (/dev/video0, 0, or a video file)."
)
@click.option(
    "--robot-id", default="follower", show_default=True, help="Calibration id (LeRobot --robot.id)."
)
@click.option(
    "--joint-frame",
    type=click.Choice(["lerobot", "so100_101_legacy"]),
    default=None,
    help="SO-101 joint frame the policy was trained in [default: the bundle's robot contract].",
)
@click.option("--task", help="The language instruction (sim-so101: defaults to the sim task's).")
@click.option(
    "--sim-task", type=click.Choice(SIM_TASKS), default=DEFAULT_SIM_TASK, show_default=True, help="sim-so101 only."
)
@click.option(
    "--sim-size", default=128, show_default=True, help="sim-so101 only: camera resolution (square)."
)
@click.option("--backend", default="auto", show_default=True, help="auto | onnxruntime | tensorrt | torch.")
@click.option("--duration", type=float, help="Seconds per episode (default: until Ctrl-C).")
@click.option("--episodes", default=1, show_default=True)
@click.option("--hz", type=float, default=None, help="Control rate [default: the bundle's robot contract].")
@click.option(
    "--override-contract",
    is_flag=True,
    help="Let --hz / --joint-frame differ from the bundle's robot contract (printed and recorded in telemetry).",
)
@click.option(
    "--first-move-limit",
    default=FirstMoveConfig.max_fraction,
    show_default=True,
    help="Refuse a first target farther than this fraction of a joint's range from the present pose "
    "(1 allows anything within the range; it is still approached slowly).",
)
@click.option(
    "--swap-threshold", default=0.5, show_default=True, help="Ask for the next chunk at this fraction left."
)
@click.option(
    "--on-exit",
    type=click.Choice(["hold", "disable"]),
    default="hold",
    show_default=True,
    help="Torque policy at the end.",
)
@click.option(
    "--stall-timeout",
    default=2.0,
    show_default=True,
    help="Seconds of holding without a usable chunk before the episode stops with a safety error.",
)
@click.option("--rtc", type=click.Choice(["off", "inference", "training", "auto"]), default="auto", show_default=True,
              help="Real-time chunking at chunk swaps: auto = training-time RTC if the bundle was trained for it, else off; inference = guided sampling (opt-in).")  # fmt: skip
@click.option(
    "--record", type=click.Path(file_okay=False, path_type=Path), help="Record a LeRobot dataset here."
)
@click.option(
    "--telemetry", type=click.Path(dir_okay=False, path_type=Path), help="Write JSONL telemetry here."
)
@display_options
def run(
    bundle: Path | None,
    policy_url: str | None,
    api_key_file: Path | None,
    tls_ca: Path | None,
    robot: str,
    port: str | None,
    can: tuple[str, ...],
    cameras: tuple[str, ...],
    robot_id: str,
    joint_frame: str,
    task: str | None,
    sim_task: str,
    sim_size: int,
    backend: str,
    duration: float | None,
    episodes: int,
    hz: float | None,
    override_contract: bool,
    first_move_limit: float,
    swap_threshold: float,
    on_exit: str,
    stall_timeout: float,
    rtc: str,
    record: Path | None,
    telemetry: Path | None,
    display: str | None,
    save_rrd: Path | None,
) -> None:
    """Drive a robot with BUNDLE at a fixed rate, inference running ahead; Ctrl-C stops it safely.

    \b
    Examples:
      molmo-edge run bundle/ --robot so101 --port /dev/ttyACM0 --camera front=/dev/video0 --task "pick up the cube"
      molmo-edge run bundle/ --robot sim-so101 --task "pick up the red cube" --duration 20
    """
    from molmoact2_edge.runtimes.preflight import preflight, resolve_run

    if (bundle is None) == (policy_url is None):
        raise MolmoEdgeError("give either BUNDLE or --policy ws://HOST:PORT (a `molmo-edge serve`), not both or neither")
    if robot in ("so101", "koch") and not port:
        raise MolmoEdgeError(
            f"--robot {robot} needs --port (the bus adapter, e.g. /dev/ttyACM0; see `molmo-edge doctor`)"
        )
    if robot in ("yam", "bimanual-yam") and not can:
        raise MolmoEdgeError(f"--robot {robot} needs --can (e.g. --can can0; see `molmo-edge doctor`)")
    opened, remote, contract = open_contract(bundle, policy_url, api_key_file, tls_ca, stall_timeout)
    choices = resolve_run(contract, robot, hz=hz, joint_frame=joint_frame, override=override_contract)
    for name, o in choices.overrides.items():
        click.echo(f"OVERRIDE: {name} {o['used']} instead of the policy's {o['contract']} (--override-contract)")
    settings = RunSettings(
        opened,
        robot,
        task,
        backend,
        duration,
        episodes,
        choices.hz,
        swap_threshold,
        record,
        telemetry,
        on_exit,
        stall_timeout,
        policy_url=policy_url,
        api_key_file=api_key_file,
        tls_ca=tls_ca,
        display=display,
        save_rrd=save_rrd,
        joint_frame=choices.joint_frame,
        first_move_limit=first_move_limit,
        overrides=choices.overrides,
        policy=remote,
        rtc=rtc,
    )
    progress = RunProgress(episodes)
    try:
        if robot == "sim-so101":
            preflight(contract, robot, None, task=task or sim_task, record=record)
            episodes_of = sim_episodes(sim_task, sim_size, choices.hz, choices.joint_frame)
            results, stats = run_policy(settings, episodes_of, observers=[progress])
        else:
            camera_objects = open_cameras(parse_cameras(cameras), choices.hz)
            arm = make_hardware_robot(robot, port, can, camera_objects, robot_id, choices.joint_frame)
            preflight(contract, robot, arm, task=task, record=record, port=port, can=can)
            results, stats = run_policy(settings, *hardware_episodes(arm), observers=[progress])
    finally:
        progress.close()
    print_summary(results, stats)
    if save_rrd is not None:
        click.echo(f"rerun recording: {save_rrd} (open it with: rerun {save_rrd})")
    if results and results[-1]["end"] == "interrupted":
        raise KeyboardInterrupt  # stopped safely already; the CLI group turns this into exit code 130
