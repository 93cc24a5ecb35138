"""`lmstack` command line: a table from verb names to the typed functions that do the work, imported lazily.

Each verb is a function in the module that does its work ("lmstack.training.pretrain:pretrain"); its signature
and Google docstring ARE the command line: positional parameters become arguments, keyword-only ones become
`--options` (required when they have no default), and the docstring's summary and `Args:` lines become the help.
A keyword parameter annotated with a dataclass is an option group (`train: TrainOptions`): each of its fields
becomes one `--option` (help from the dataclass's `Args:` lines or field metadata), and the function receives
the dataclass instance. A verb's module is imported only when that verb runs or shows its help, so
`lmstack --help` reads the summaries straight from the source files and imports neither torch nor the models.

This module adds only what is about output (`--json`, streaming to stdout, tables) and turns every user-facing
error into one line on stderr with exit code 1; usage errors exit with 2 (Typer's default).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import re
import sys
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer._click import exceptions as click_errors  # typer vendors click: its exceptions are these
from typer.core import TyperGroup

from lmstack.errors import LmstackError
from lmstack.runconfig import field_helps, parse_docstring

# ------------------------------------------------------------------------------------- errors


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn bad input into `error: ...` on one line of stderr and exit code 1, never a traceback."""
    try:
        yield
    except LmstackError as e:
        _fail(str(e))
    except OSError as e:  # FileNotFoundError, PermissionError, IsADirectoryError, a full disk ...
        if isinstance(e, BrokenPipeError):  # the reader went away (`| head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(1) from None
        _fail(str(e))  # "[Errno 2] No such file or directory: 'x'"
    except KeyboardInterrupt:
        _fail("interrupted")


def _fail(message: str) -> typing.NoReturn:
    sys.stdout.flush()
    print(f"error: {_one_line(message) or 'unknown error'}", file=sys.stderr, flush=True)
    raise typer.Exit(1)


# ------------------------------------------------------------------------ functions -> commands


def _annotated(p: inspect.Parameter, help_text: str | None) -> inspect.Parameter:
    """`p` as a keyword parameter whose annotation carries its Typer argument / option."""
    if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty:
        info: Any = typer.Argument(help=help_text, show_default=False)
    else:
        # A list option is repeated (--stop A --stop B): show the item type, not "list[str]".
        lists = [a for a in (p.annotation, *typing.get_args(p.annotation)) if typing.get_origin(a) is list]
        metavar = f"<{getattr(typing.get_args(lists[0])[0], '__name__', 'str')}>" if lists else None
        info = typer.Option(help=help_text, show_default=p.default not in (None, p.empty), metavar=metavar)
    return inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default,
                             annotation=Annotated[p.annotation, info])


def option_group_of(annotation: Any) -> type | None:
    """The dataclass a parameter is annotated with (`G` or `G | None`): an option group."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def cli_parameters(fn: Callable[..., Any], skip: set[str]) -> tuple[list[inspect.Parameter], dict[str, type]]:
    """The parameters of `fn` as Typer arguments/options, with help from its docstring, and the option groups
    (parameter name -> dataclass) whose fields were expanded into options."""
    _, helps = parse_docstring(fn.__doc__)
    params: list[inspect.Parameter] = []
    groups: dict[str, type] = {}
    for p in inspect.signature(fn, eval_str=True).parameters.values():
        if p.name in skip:
            continue
        group = option_group_of(p.annotation) if p.kind is p.KEYWORD_ONLY else None
        if group is None:
            params.append(_annotated(p, helps.get(p.name)))
            continue
        groups[p.name] = group
        hints, group_helps = typing.get_type_hints(group), field_helps(group)
        for f in dataclasses.fields(group):
            # None = not given, so a YAML config (or the group's own default) can supply the value.
            option = inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                       annotation=hints[f.name] | None)
            params.append(_annotated(option, group_helps.get(f.name)))
    names = [p.name for p in params]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:  # a programming error in the verb's signature, not bad input
        raise TypeError(f"{fn.__qualname__}: option(s) {', '.join(clash)} appear both as a parameter and in "
                        "an option group")
    return params, groups


def build_command(name: str, fn: Callable[..., Any], run: Callable[..., None], *, skip: set[str] = frozenset(),
                  extra: list[inspect.Parameter] = ()) -> click.Command:
    """The click command for `fn`: its signature (minus `skip`, plus `extra`) is the command line, option groups
    are rebuilt into their dataclasses, and `run(fn, **parsed)` does the call and the printing."""
    params, groups = cli_parameters(fn, set(skip))
    params += list(extra)
    # Arguments first (in their order), then options, so the signature is valid and positions are kept.
    params.sort(key=lambda p: not isinstance(typing.get_args(p.annotation)[1], typer.models.ArgumentInfo))
    arguments = {p.name for p in params if isinstance(typing.get_args(p.annotation)[1], typer.models.ArgumentInfo)}

    def command(**kwargs: Any) -> None:
        for param, group in groups.items():  # options not given keep the group's defaults (None: not given)
            values = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(group)}
            kwargs[param] = group(**{k: v for k, v in values.items() if v is not None})
        with user_errors():
            _check_text_arguments(kwargs, arguments)
            run(fn, **kwargs)

    summary, _ = parse_docstring(fn.__doc__)
    command.__name__ = name.replace("-", "_")
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {}  # Typer reads the types off the signature
    command.__doc__ = summary
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    single.command(name, help=summary)(command)
    return typer.main.get_command(single)


def _check_text_arguments(kwargs: dict[str, Any], arguments: set[str]) -> None:
    """Refuse command-line text that is not UTF-8 (`--prompt $'caf\\xe9'`) before any work, naming the option
    (or the positional argument)."""
    from lmstack.io import check_utf8
    for name, value in kwargs.items():
        label = f"the {name} argument" if name in arguments else f"--{name.replace('_', '-')}"
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str):
                check_utf8(item, label)


def _flag(name: str, decl: str, help: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False,
                             annotation=Annotated[bool, typer.Option(decl, help=help)])


JSON_FLAG = _flag("as_json", "--json", "Print one JSON object instead of text.")


# ------------------------------------------------------------------------------------- output


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


def _print_json(result: Any) -> None:
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    print(json.dumps(result, indent=2, ensure_ascii=False, default=str))


def _call(fn: Callable[..., Any], **kwargs: Any) -> None:
    fn(**kwargs)


def _call_print_json(fn: Callable[..., Any], **kwargs: Any) -> None:
    _print_json(fn(**kwargs))


def _generate(fn: Callable[..., Any], as_json: bool, **kwargs: Any) -> None:
    stream = not as_json and (kwargs["sampling"].num_beams or 1) == 1
    out = fn(**kwargs, on_text=_write if stream else None)
    if as_json:
        print(json.dumps(out.to_dict(), ensure_ascii=False))
    else:
        print("" if stream else out.text, flush=True)


def _chat(fn: Callable[..., Any], **kwargs: Any) -> None:
    failures = fn(**kwargs)
    if failures:
        raise typer.Exit(1)


def _models_list(fn: Callable[..., Any], as_json: bool) -> None:
    entries = fn()
    if as_json:
        print(json.dumps([e.__dict__ for e in entries], indent=2))
        return
    width = max(len(e.name) for e in entries)
    for kind, title in (("model", "Models (weights from installed packages):"),
                        ("preset", "Presets (architectures only, no weights):")):
        print(title)
        for e in (e for e in entries if e.kind == kind):
            status = ("installed" if e.installed else "not installed") if kind == "model" else ""
            print(f"  {e.name:<{width}}  {status:<13}  {e.description}")


def _models_show(fn: Callable[..., Any], name: str, as_json: bool) -> None:
    summary = fn(name)
    if as_json:
        print(json.dumps(summary, indent=2, ensure_ascii=False, default=str))
    else:
        print(format_summary(summary))


def format_summary(summary: dict[str, Any]) -> str:
    """`lmstack models show` as aligned `key  value` lines, with the chat template last."""
    summary = dict(summary)
    cfg = summary.pop("config")
    template = summary.pop("chat_template", None)
    tokenizer = summary.pop("tokenizer", None)
    rows: list[tuple[str, Any]] = [("name", cfg.get("name")), ("source", summary.pop("source")),
                                   ("architecture", _architecture(cfg)),
                                   ("parameters", f"{summary.pop('parameters'):,}")]
    if "n_layer" in cfg:
        rows.append(("layers", cfg["n_layer"]))
    else:
        rows.append(("layers", f"{cfg.get('n_encoder_layer')} encoder + {cfg.get('n_decoder_layer')} decoder"))
    rows += [("heads", cfg.get("n_head")), ("kv heads", cfg.get("n_kv_head", cfg.get("n_head"))),
             ("d_model", cfg.get("d_model")), ("d_ff", cfg.get("d_ff")), ("context", cfg.get("max_seq_len")),
             ("vocab", cfg.get("vocab_size")), ("dtype", summary.pop("dtype"))]
    summary.pop("family", None)
    taken = {k for k, _ in rows}
    for key, value in summary.items():  # importer metadata, e.g. the GGUF file type and quant types
        key = key.replace("_", " ")
        rows.append((f"source {key}" if key in taken else key, _plain(value)))
    if tokenizer is not None:
        rows.append(("tokenizer", f"vocab {tokenizer['vocab_size']}, bos {tokenizer['bos']!r}, "
                                  f"eos {tokenizer['eos']!r}, hash {tokenizer['hash']}"))
    else:
        rows.append(("tokenizer", "none"))
    rows.append(("chat template", "yes (below)" if template else "none"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if template:
        lines += ["", "chat template:", *("  " + line for line in template.splitlines())]
    return "\n".join(lines)


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def _architecture(cfg: dict[str, Any]) -> str:
    family = cfg.get("family")
    if family == "decoder":
        style = "llama-style" if cfg.get("positions") == "rope" and cfg.get("gated_mlp") else "gpt2-style"
        return (f"decoder ({style}: {cfg['positions']} positions, {cfg['norm']}, {cfg['activation']}"
                f"{' gated' if cfg.get('gated_mlp') else ''} MLP, "
                f"{'tied' if cfg.get('tie_embeddings') else 'separate'} embeddings)")
    if family == "encoder":
        return f"encoder (BERT-style, {cfg.get('pooling')} pooling)"
    return f"seq2seq ({cfg.get('positions')} positions, {'pre' if cfg.get('norm_first') else 'post'}-norm)"


def _convert(fn: Callable[..., Any], **kwargs: Any) -> None:
    out = fn(**kwargs)
    print(f"wrote {kwargs['to']} checkpoint to {out}", file=sys.stderr)


def _tokenizer_train(fn: Callable[..., Any], **kwargs: Any) -> None:
    print(f"wrote tokenizer to {fn(**kwargs)}", file=sys.stderr)


def _data_prepare(fn: Callable[..., Any], **kwargs: Any) -> None:
    manifest = fn(**kwargs)
    print(json.dumps({"out": kwargs["out"], "documents": manifest["documents"], "tokens": manifest["tokens"],
                      "dtype": manifest["dtype"]}, indent=2))


def _plan(fn: Callable[..., Any], as_json: bool, **kwargs: Any) -> None:
    result = fn(**kwargs)
    if as_json:
        _print_json(result)
        return
    mib = 2**20
    for key in ("weights_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "total_bytes_per_device"):
        print(f"{key.removesuffix('_bytes').replace('_', ' '):<24} {result[key] / mib:>12,.1f} MiB")
    print(f"{'parameters':<24} {result['parameters']:>12,}")
    print(f"{'trainable parameters':<24} {result['trainable_parameters']:>12,}")
    print(f"{'train FLOPs per token':<24} {result['train_flops_per_token']:>12.3e}")
    print(f"{'Chinchilla tokens':<24} {result['chinchilla_tokens']:>12.3e}")
    if result.get("time_s") is not None:
        print(f"{'time at peak x mfu':<24} {result['time_s'] / 3600:>12,.1f} h")


def _finetune(fn: Callable[..., Any], **kwargs: Any) -> None:
    result = dataclasses.asdict(fn(**kwargs))
    for name, counts in result["data"].items():  # the length policy's effect, per task, on stderr
        print(f"data {name}: {counts['kept']} of {counts['examples']} examples kept, {counts['truncated']} "
              f"truncated, {counts['dropped']} dropped (max_seq_len, overflow)", file=sys.stderr)
    print(f"adapter: {result['adapter_bytes'] / 2**20:.2f} MiB, {result['trainable_params']:,} trainable "
          f"parameters ({result['trainable_pct']:.3f}%)", file=sys.stderr)
    _print_json(result)


def _merge(fn: Callable[..., Any], **kwargs: Any) -> None:
    print(f"wrote merged native checkpoint to {fn(**kwargs)}", file=sys.stderr)


def _eval(fn: Callable[..., Any], as_json: bool, **kwargs: Any) -> None:
    from lmstack.evaluation.report import summary, table
    results = fn(**kwargs)
    print(json.dumps(summary(results), ensure_ascii=False) if as_json else table(results), flush=True)


def _rag_search(fn: Callable[..., Any], as_json: bool, **kwargs: Any) -> None:
    hits = fn(**kwargs)
    if as_json:
        _print_json(hits)
    for h in [] if as_json else hits:
        print(f"[{h['n']}] {h['score']:.4f} (cos {h['similarity']:.3f})  {h['path']} ({h['location']})")
        print("    " + " ".join(h["text"].split())[:200])


def _rag_ask(fn: Callable[..., Any], as_json: bool, **kwargs: Any) -> None:
    if as_json:  # the contract: answer, citations [{n, source, location, score}], retrieved
        result = fn(**{**kwargs, "stream": False})
        print(json.dumps({k: result[k] for k in ("answer", "citations", "citations_by", "evidence", "retrieved",
                                                 "refused", "reason")},
                         indent=2, ensure_ascii=False))
    else:
        fn(**kwargs, output=sys.stdout)


def _rag_eval(fn: Callable[..., Any], **kwargs: Any) -> None:
    report = fn(**kwargs)
    _print_json({k: v for k, v in report.items() if k != "per_question"})


# ------------------------------------------------------------------------------------- the verb table


@dataclass(frozen=True)
class Verb:
    """A command: the function that does the work ("module:function", imported when the verb runs) and how its
    result is shown (`run(fn, **parsed)`); `skip` leaves out parameters the CLI cannot express (callbacks,
    streams), `json` adds --json (passed to `run` as `as_json`)."""

    target: str
    run: Callable[..., None] = _call_print_json
    skip: frozenset[str] = frozenset()
    json: bool = False


@dataclass(frozen=True)
class Group:
    """A command with sub-commands (`lmstack rag index`)."""

    help: str
    verbs: dict[str, Verb | Group] = field(default_factory=dict)


VERBS: dict[str, Verb | Group] = {
    "generate": Verb("lmstack.generation.chat:generate", _generate, frozenset({"on_text"}), json=True),
    "chat": Verb("lmstack.generation.chat:chat", _chat, frozenset({"input", "output", "notices"})),
    "models": Group("List and inspect models.", {
        "list": Verb("lmstack.checkpoints.inspect:list_models", _models_list, json=True),
        "show": Verb("lmstack.checkpoints.inspect:show_model", _models_show, json=True),
    }),
    "convert": Verb("lmstack.checkpoints.inspect:convert", _convert),
    "tokenizer": Group("Train tokenizers.", {
        "train": Verb("lmstack.data.tokenizer_train:train_tokenizer", _tokenizer_train),
    }),
    "data": Group("Prepare training data.", {
        "prepare": Verb("lmstack.data.prepare:prepare_data", _data_prepare),
    }),
    "plan": Verb("lmstack.plan:plan", _plan, json=True),
    "quantize": Verb("lmstack.compression.quantize:quantize", _call),
    "pretrain": Verb("lmstack.training.pretrain:pretrain"),
    "finetune": Verb("lmstack.training.finetune:finetune", _finetune),
    "merge": Verb("lmstack.training.finetune:merge", _merge),
    "eval": Verb("lmstack.evaluation.command:evaluate", _eval, json=True),
    "serve": Verb("lmstack.serving:serve", _call),
    "rag": Group("Retrieval-augmented generation: index, search, ask, eval.", {
        "index": Verb("lmstack.rag:rag_index"),
        "search": Verb("lmstack.rag:rag_search", _rag_search, json=True),
        "ask": Verb("lmstack.rag:rag_ask", _rag_ask, frozenset({"on_text", "output"}), json=True),
        "eval": Verb("lmstack.rag:rag_eval", _rag_eval),
    }),
    "embed": Verb("lmstack.rag:embed"),
    "raft": Group("RAFT fine-tuning data.", {
        "build": Verb("lmstack.rag:raft_build"),
    }),
}


def resolve(target: str) -> Callable[..., Any]:
    """The function named by "module:function" (this imports the module)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def verb_summary(target: str) -> str:
    """The docstring summary of a verb's function, read from its source file without importing it, so
    `lmstack --help` stays fast; empty when the source cannot be found."""
    module, _, name = target.partition(":")
    base = Path(__file__).parent.joinpath(*module.split(".")[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            # A top-level `def name(...) -> T:` and the docstring that opens its body (a regex: parsing whole
            # modules with ast costs ~5 ms each).
            found = re.search(rf'^def {name}\(.*?\)[^:\n]*:\s*\n\s+"""(.*?)"""', path.read_text(encoding="utf-8"),
                              re.S | re.M)
            return parse_docstring(found.group(1))[0] if found else ""
    return ""


class _UsageError(click_errors.UsageError):
    """A usage error shown as one `error:` line (exit code 2), like every other error, instead of click's
    usage block."""

    def show(self, file: Any = None) -> None:
        hint = f" (see `{self.ctx.command_path} --help`)" if self.ctx is not None else ""
        print(f"error: {_one_line(self.format_message())}{hint}", file=file or sys.stderr, flush=True)


@contextmanager
def _usage_on_one_line() -> Iterator[None]:
    try:
        yield
    except click_errors.UsageError as e:
        if isinstance(e, _UsageError) or type(e).__name__ == "NoArgsIsHelpError":  # bare `lmstack`: the help
            raise
        raise _UsageError(e.format_message(), e.ctx) from None  # keeps "Invalid value for --x:"


class LazyGroup(TyperGroup):
    """A click group over a verb table: sub-commands are built (and their modules imported) only when used."""

    def __init__(self, *, table: dict[str, Verb | Group] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("rich_markup_mode", None)
        super().__init__(**kwargs)
        self.table = VERBS if table is None else table

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _usage_on_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _usage_on_one_line():  # a sub-command's own arguments are parsed in here
            return super().invoke(ctx)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.table)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = self.table.get(cmd_name)
        if isinstance(entry, Group):
            return LazyGroup(name=cmd_name, table=entry.verbs, help=entry.help, no_args_is_help=True)
        if entry is None:
            return None
        try:
            fn = resolve(entry.target)
        except ImportError as e:  # a verb whose module is missing in this install
            raise click_errors.ClickException(f"{cmd_name}: cannot import {entry.target} ({e})") from None
        return build_command(cmd_name, fn, entry.run, skip=set(entry.skip), extra=[JSON_FLAG] if entry.json else [])

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(map(len, self.table), default=0)  # as click's own listing
        rows = []
        for name, entry in self.table.items():
            text = entry.help if isinstance(entry, Group) else verb_summary(entry.target)
            rows.append((name, click.utils.make_default_short_help(text, limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


app = typer.Typer(name="lmstack", cls=LazyGroup, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None)


@app.callback()
def _root() -> None:
    """A hackable toolkit for the whole life of an LLM."""


def main() -> None:
    app(prog_name="lmstack")


if __name__ == "__main__":
    main()
