"""Device profiles, budgets and profiling: `edgefa profiles ...`, `edgefa budget`, `edgefa profile`
(and `profile compare`, whose BP side runs torch in its own process). No torch in this process."""

from __future__ import annotations

import json

import click
from rich.markup import escape

from ..cli_types import COUNT, OUT_FOLDER, POSITIVE, SEED, Finite
from .common import check_out, console, device_client, feature_cache_options, force_option, link_options, progress_bar


@click.group("profiles")
def profiles_group() -> None:
    """Device profiles: what each device can compute, hold and measure (one TOML file per device)."""


@profiles_group.command("list")
def profiles_list_command():
    """The device profiles edgefa knows."""
    from ..device_profiles import list_profiles, load_profile
    from ..report.terminal import device_profiles_table

    console.print(device_profiles_table([load_profile(name) for name in list_profiles()]))


@profiles_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="print the profile as JSON")
def profiles_show_command(name, as_json):
    """One device profile (a name from `profiles list`, or a TOML file)."""
    from ..device_profiles import load_profile
    from ..report.terminal import device_profile_table

    p = load_profile(name)
    if as_json:
        click.echo(json.dumps(p.as_dict(), indent=2))
    else:
        console.print(device_profile_table(p))


@profiles_group.command("detect")
@click.option("--json", "as_json", is_flag=True, help="print the profile as JSON")
def profiles_detect_command(as_json):
    """The profile of this machine: a Jetson or Raspberry Pi by its device tree (or L4T release),
    otherwise a generic host filled in by detection."""
    from ..device_profiles import detect_profile
    from ..report.terminal import device_profile_table

    p, how = detect_profile()
    if as_json:
        click.echo(json.dumps({**p.as_dict(), "how": how}, indent=2))
        return
    console.print(f"this machine: [bold]{escape(p.name)}[/] ({escape(how)})")
    console.print(device_profile_table(p))


@click.command("budget")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--profile", "profile_name", default=None, help="device profile name or TOML (default: detected)")
@click.option("--batch", "batch_size", type=POSITIVE, default=32, show_default=True)
@click.option("--provider", default=None, help="execution provider that would run it (default: the profile's first)")
@click.option("--samples", type=COUNT, default=0, help="fine-tuning samples held on the device")
@click.option("--json", "as_json", is_flag=True, help="print the budget as JSON")
@feature_cache_options
def budget_command(bundle, profile_name, batch_size, provider, samples, as_json, feature_cache, cache_mb):
    """Predict peak memory and a lower bound on step time of fine-tuning BUNDLE on a device."""
    from ..bundle import read_bundle
    from ..device_profiles import detect_profile, load_profile
    from ..device_profiles.budget import budget
    from ..report.terminal import print_budget

    b = read_bundle(bundle)
    p = load_profile(profile_name) if profile_name else detect_profile()[0]
    result = budget(b.manifest, p, batch_size, provider, samples,
                    feature_cache_budget=(cache_mb << 20) if feature_cache else None)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    print_budget(console, result, bundle, p, batch_size)


class DefaultCommandGroup(click.Group):
    """A group whose first argument, when it names no subcommand, goes to `default_command`:
    `edgefa profile BUNDLE ...` is `edgefa profile run BUNDLE ...`, beside `edgefa profile compare`."""

    default_command = "run"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def profile_options(f):
    options = [
        click.option("--steps", type=POSITIVE, default=200, show_default=True),
        click.option("--batch", "batch_size", type=POSITIVE, default=32, show_default=True),
        click.option("--data", "data_spec", default=None,
                     help="npz:FILE | digits | mnist:DIR (default: seeded Gaussian samples of the bundle's shape)"),
        click.option("--out", type=OUT_FOLDER, required=True, help="report directory to write"),
        click.option("--device", "url", default=None,
                     help="profile on a device over the link (a pyserial URL): the steps run in a scratch session "
                          "on the bundle it serves, which must be BUNDLE, and are undone; the device's state is unchanged"),
        click.option("--deploy", is_flag=True,
                     help="with --device: deploy BUNDLE first when the device serves another bundle (that bundle "
                          "and its state are kept on the device as bundle.prev, as `edgefa deploy` does)"),
        click.option("--profile", "profile_name", default=None, help="device profile (default: detected)"),
        click.option("--warmup", type=COUNT, default=5, show_default=True,
                     help="windows of each repeated phase left out of the statistics"),
        click.option("--interval", type=Finite(min=0.001), default=0.02, show_default=True,
                     help="energy and memory sampling interval, seconds"),
        click.option("--threads", type=POSITIVE, default=None, help="onnxruntime intra-op threads"),
        click.option("--seed", type=SEED, default=0, show_default=True),
        force_option,
    ]
    for option in reversed(options):
        f = option(f)
    return link_options(f)


def _profile_config(steps, batch_size, warmup, interval, threads, seed, profile_name):
    from ..profile_runs.session import ProfileConfig
    return ProfileConfig(steps=steps, batch_size=batch_size, warmup=warmup, sample_interval_s=interval,
                         threads=threads, seed=seed, profile=profile_name)


def _check_deploy_flag(deploy: bool, url: str | None) -> None:
    if deploy and not url:
        raise click.UsageError("--deploy needs --device URL (a local profile runs on a scratch copy of BUNDLE)")


def _print_device_state(result: dict, url: str | None) -> None:
    """After a profile over the link: what it did to the device (nothing, unless --deploy deployed)."""
    from ..report.terminal import deploy_lines

    state = result.get("device_state")
    if not state:
        return
    if state["deployed"]:
        console.print(escape(deploy_lines(state["deployed"], url)), soft_wrap=True)
    console.print(f"the profile's steps ran in a scratch session and were undone: the device is at step "
                  f"{state['step_after']}, as before them", soft_wrap=True)


@click.group("profile", cls=DefaultCommandGroup)
def profile_group() -> None:
    """Profile fine-tuning: `edgefa profile BUNDLE --out DIR` (locally or --device URL), and
    `edgefa profile compare BUNDLE --out DIR` (DFA on the device runtime against BP in torch)."""


@profile_group.command("run")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@profile_options
def profile_run_command(bundle, steps, batch_size, data_spec, out, url, deploy, profile_name, warmup, interval,
                        threads, seed, force, key_file, baud):
    """Run fine-tuning steps under the profiler; write profile.json and report.html into --out."""
    from ..profile_runs.session import profile_local, profile_over_link
    from ..report.outputs import write_profile
    from ..report.terminal import phases_table
    from ..shared.datasets import load_dataset

    cfg = _profile_config(steps, batch_size, warmup, interval, threads, seed, profile_name)
    _check_deploy_flag(deploy, url)
    check_out(out, "profile", force)
    data = load_dataset(data_spec) if data_spec else None
    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"profiling on {url or 'this machine'}", total=steps, status="")
        on_step = (lambda s, loss, *rest: bar.update(task, advance=1, status=f"loss {loss:.3f}"))
        if url:
            with device_client(url, key_file, baud) as dev:
                result = profile_over_link(dev, bundle, cfg, data, on_step=on_step, deploy=deploy)
        else:
            result = profile_local(bundle, cfg, data, on_step=on_step)
    paths = write_profile(result, out)
    console.print(phases_table(result))
    _print_device_state(result, url)
    console.print(f"wrote {paths[0]} and {paths[1]}")


@profile_group.command("compare")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@profile_options
def profile_compare_command(bundle, steps, batch_size, data_spec, out, url, deploy, profile_name, warmup, interval,
                            threads, seed, force, key_file, baud):
    """DFA on the device runtime (locally, or on --device) against BP in torch on this host: the same
    model, batches and energy source; writes compare.json and compare.html with the ratios."""
    from ..bundle import read_bundle
    from ..profile_runs.compare import check_comparable, compare, run_in_process
    from ..profile_runs.session import profile_over_link
    from ..report.outputs import write_compare
    from ..report.terminal import compare_table

    cfg = _profile_config(steps, batch_size, warmup, interval, threads, seed, profile_name)
    _check_deploy_flag(deploy, url)
    check_comparable(read_bundle(bundle).manifest, bundle)     # both sides can run it: before any work
    check_out(out, "profile-compare", force)
    with progress_bar(transient=True) as bar:
        task = bar.add_task("dfa on " + (url or "the device runtime (own process)"), total=None, status="")
        if url:
            from ..shared.datasets import load_dataset
            with device_client(url, key_file, baud) as dev:
                dfa = profile_over_link(dev, bundle, cfg, load_dataset(data_spec) if data_spec else None,
                                        deploy=deploy)
        else:
            dfa = run_in_process("edgefa.profile_runs.session", bundle, cfg, data_spec)
        bar.update(task, total=1, completed=1)
        task = bar.add_task("bp in torch (own process)", total=None, status="")
        bp = run_in_process("edgefa.training.bp_profile", bundle, cfg, data_spec)
        bar.update(task, total=1, completed=1)
    result = compare(dfa, bp)
    paths = write_compare(result, out)
    console.print(compare_table(result, dfa, bp))
    _print_device_state(dfa, url)
    console.print(f"wrote {paths[0]} and {paths[1]}")


COMMANDS = (budget_command,)
