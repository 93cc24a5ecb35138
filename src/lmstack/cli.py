"""`lmstack` command line: maps verbs onto the typed functions in `lmstack.commands` with Typer.

A verb's options are read off its function: positional parameters become arguments, keyword-only ones become
`--options` (required when they have no default), and the docstring's summary and `Args:` lines become the help.
This module adds only what is about output (`--json`, streaming to stdout) and turns every user-facing error
into one line on stderr with exit code 1; usage errors exit with 2 (Typer's default).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from lmstack import commands, rag
from lmstack.generation import chat as generation_chat
from lmstack.errors import LmstackError

app = typer.Typer(name="lmstack", help="A hackable toolkit for the whole life of an LLM.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
models_app = typer.Typer(help="List and inspect models.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(models_app, name="models")
tokenizer_app = typer.Typer(help="Train tokenizers.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(tokenizer_app, name="tokenizer")
data_app = typer.Typer(help="Prepare training data.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")


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


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into the text before `Args:` and one help line per argument."""
    summary, _, args = inspect.cleandoc(doc or "").partition("\nArgs:\n")
    helps: dict[str, str] = {}
    lines = [line for line in args.splitlines() if line.strip()]
    indent = len(lines[0]) - len(lines[0].lstrip()) if lines else 0  # `name: help` lines; deeper = continued
    name = None
    for line in lines:
        match = re.match(r"\s*(\w+):\s*(.*)$", line)
        if match and len(line) - len(line.lstrip()) == indent:
            name, helps[match.group(1)] = match.group(1), match.group(2)
        elif name is not None:
            helps[name] += " " + line.strip()
    return summary.strip(), helps


def cli_parameters(fn: Callable[..., Any], skip: set[str]) -> list[inspect.Parameter]:
    """The parameters of `fn` as Typer arguments/options, with help from its docstring."""
    _, helps = parse_docstring(fn.__doc__)
    params = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in skip:
            continue
        help_text = helps.get(p.name)
        if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty:
            info: Any = typer.Argument(help=help_text, show_default=False)
        else:
            # A list option is repeated (--stop A --stop B): show the item type, not "list[str]".
            origins = {typing.get_origin(p.annotation), *(typing.get_origin(a) for a in typing.get_args(p.annotation))}
            metavar = "<str>" if list in origins else None
            info = typer.Option(help=help_text, show_default=p.default not in (None, p.empty), metavar=metavar)
        params.append(inspect.Parameter(p.name, inspect.Parameter.KEYWORD_ONLY, default=p.default,
                                        annotation=Annotated[p.annotation, info]))
    return params


def verb(group: typer.Typer, fn: Callable[..., Any], name: str, *, skip: set[str] = frozenset(),
         extra: list[inspect.Parameter] = (), run: Callable[..., None]) -> None:
    """Register `fn` as command `name`: its signature (minus `skip`, plus `extra`) is the command line, and
    `run(**parsed)` does the call and the printing."""
    params = cli_parameters(fn, set(skip)) + list(extra)
    # Arguments first (in their order), then options, so the signature is valid and positions are kept.
    params.sort(key=lambda p: not isinstance(typing.get_args(p.annotation)[1], typer.models.ArgumentInfo))

    def command(**kwargs: Any) -> None:
        with user_errors():
            run(**kwargs)

    summary, _ = parse_docstring(fn.__doc__)
    command.__name__ = run.__name__
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {}  # Typer reads the types off the signature
    command.__doc__ = summary
    group.command(name, help=summary)(command)


def _flag(name: str, decl: str, help: str) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False,
                             annotation=Annotated[bool, typer.Option(decl, help=help)])


JSON_FLAG = _flag("as_json", "--json", "Print one JSON object instead of text.")


def _write(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()


# ------------------------------------------------------------------------------------- verbs


def _generate(as_json: bool, **kwargs: Any) -> None:
    stream = not as_json and kwargs["num_beams"] == 1
    out = generation_chat.generate(**kwargs, on_text=_write if stream else None)
    if as_json:
        print(json.dumps(out.to_dict(), ensure_ascii=False))
    else:
        print("" if stream else out.text, flush=True)


def _chat(**kwargs: Any) -> None:
    failures = generation_chat.chat(**kwargs)
    if failures:
        raise typer.Exit(1)


def _models_list(as_json: bool) -> None:
    entries = commands.list_models()
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


def _models_show(name: str, as_json: bool) -> None:
    summary = commands.show_model(name)
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


def _convert(**kwargs: Any) -> None:
    out = commands.convert(**kwargs)
    print(f"wrote {kwargs['to']} checkpoint to {out}", file=sys.stderr)


verb(app, generation_chat.generate, "generate", skip={"on_text"}, extra=[JSON_FLAG], run=_generate)
verb(app, generation_chat.chat, "chat", skip={"input", "output", "notices"}, run=_chat)
verb(app, commands.convert, "convert", run=_convert)
verb(models_app, commands.list_models, "list", extra=[JSON_FLAG], run=_models_list)
verb(models_app, commands.show_model, "show", extra=[JSON_FLAG], run=_models_show)


def _print_json(result: Any) -> None:
    print(json.dumps(result, indent=2, ensure_ascii=False, default=str))


def _tokenizer_train(**kwargs: Any) -> None:
    print(f"wrote tokenizer to {commands.tokenizer_train(**kwargs)}", file=sys.stderr)


def _data_prepare(**kwargs: Any) -> None:
    manifest = commands.data_prepare(**kwargs)
    print(json.dumps({"out": kwargs["out"], "documents": manifest["documents"], "tokens": manifest["tokens"],
                      "dtype": manifest["dtype"]}, indent=2))


def _pretrain(**kwargs: Any) -> None:
    _print_json(commands.pretrain(**kwargs))


def _plan(as_json: bool, **kwargs: Any) -> None:
    result = commands.plan(**kwargs)
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


verb(app, commands.plan, "plan", extra=[JSON_FLAG], run=_plan)
verb(tokenizer_app, commands.tokenizer_train, "train", run=_tokenizer_train)
verb(data_app, commands.data_prepare, "prepare", run=_data_prepare)
verb(app, commands.pretrain, "pretrain", run=_pretrain)


def _finetune(**kwargs: Any) -> None:
    result = commands.finetune(**kwargs)
    for name, counts in result["data"].items():  # the length policy's effect, per task, on stderr
        print(f"data {name}: {counts['kept']} of {counts['examples']} examples kept, {counts['truncated']} "
              f"truncated, {counts['dropped']} dropped (max_seq_len, overflow)", file=sys.stderr)
    print(f"adapter: {result['adapter_bytes'] / 2**20:.2f} MiB, {result['trainable_params']:,} trainable "
          f"parameters ({result['trainable_pct']:.3f}%)", file=sys.stderr)
    _print_json(result)


def _merge(**kwargs: Any) -> None:
    print(f"wrote merged native checkpoint to {commands.merge(**kwargs)}", file=sys.stderr)


verb(app, commands.finetune, "finetune", run=_finetune)
verb(app, commands.merge, "merge", run=_merge)

# ------------------------------------------------------------------------------------------ eval


def _eval(as_json: bool, **kwargs: Any) -> None:
    from lmstack.evaluation.report import summary, table
    results = commands.evaluate(**kwargs)
    print(json.dumps(summary(results), ensure_ascii=False) if as_json else table(results), flush=True)


verb(app, commands.evaluate, "eval", extra=[JSON_FLAG], run=_eval)


from lmstack.serving import serve  # noqa: E402 (light: FastAPI and torch load inside serve)

verb(app, serve, "serve", run=serve)

# ------------------------------------------------------------------ RAG, RAFT and embeddings (lmstack.rag)

rag_app = typer.Typer(help="Retrieval-augmented generation: index, search, ask, eval.", no_args_is_help=True,
                      rich_markup_mode=None)
app.add_typer(rag_app, name="rag")
raft_app = typer.Typer(help="RAFT fine-tuning data.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(raft_app, name="raft")


def _rag_search(as_json: bool, **kwargs: Any) -> None:
    hits = rag.rag_search(**kwargs)
    if as_json:
        _print_json(hits)
    for h in [] if as_json else hits:
        print(f"[{h['n']}] {h['score']:.4f} (cos {h['similarity']:.3f})  {h['path']} ({h['location']})")
        print("    " + " ".join(h["text"].split())[:200])


def _rag_ask(as_json: bool, **kwargs: Any) -> None:
    if as_json:  # the contract: answer, citations [{n, source, location, score}], retrieved
        result = rag.rag_ask(**{**kwargs, "stream": False})
        print(json.dumps({k: result[k] for k in ("answer", "citations", "retrieved", "refused", "reason")},
                         indent=2, ensure_ascii=False))
    else:
        rag.rag_ask(**kwargs, output=sys.stdout)


def _rag_eval(**kwargs: Any) -> None:
    report = rag.rag_eval(**kwargs)
    _print_json({k: v for k, v in report.items() if k != "per_question"})


verb(rag_app, rag.rag_index, "index", run=lambda **kw: _print_json(rag.rag_index(**kw)))
verb(rag_app, rag.rag_search, "search", extra=[JSON_FLAG], run=_rag_search)
verb(rag_app, rag.rag_ask, "ask", skip={"on_text", "output"}, extra=[JSON_FLAG], run=_rag_ask)
verb(rag_app, rag.rag_eval, "eval", run=_rag_eval)
verb(app, rag.embed, "embed", run=lambda **kw: _print_json(rag.embed(**kw)))
verb(raft_app, rag.raft_build, "build", run=lambda **kw: _print_json(rag.raft_build(**kw)))


def main() -> None:
    app(prog_name="lmstack")


if __name__ == "__main__":
    main()
