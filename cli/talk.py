"""`edgezo eval` and `edgezo chat`: a model, a run folder or an adapter opened for scoring
or for a conversation, with the prompt it was trained on."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edgezo.errors import ConfigError

from .app import err_console, user_errors
from .options import cli_fields, config_command

EVAL_FIELDS = ("model", "dtype", "trust_remote_code", "task", "data_dir", "template",
               "max_length", "eval_batch_size", "profile")


@user_errors
@config_command(cli_fields(names=EVAL_FIELDS), {
    "split": (str, typer.Option("test", help="train, validation or test")),
    "eval_examples": (int | None, typer.Option(
        None, "--eval-examples", min=1, help="Evaluate at most the first N examples of the "
        "split (default: all), as finetune --eval-examples")),
    # the former name, kept working (and out of --help) for scripts that use it
    "max_examples": (int | None, typer.Option(None, "--max-examples", min=1, hidden=True)),
    "as_json": (bool, typer.Option(False, "--json", help="Print the result as JSON")),
})
def evaluate(ctx: typer.Context, given: dict, split: str, eval_examples: int | None,
             max_examples: int | None, as_json: bool) -> None:
    """A model's score on a task split: accuracy by candidate log-likelihood, or F1 and
    exact match of the answers it writes (squad). --model takes a model, or what
    finetune saved: a run folder, its model/ (a LoRA, prefix or prompt
    run's adapter is put on its base), with the prompt it was trained on."""
    from edgezo.tasks.base import SPLITS

    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if max_examples is not None:
        if eval_examples is not None and eval_examples != max_examples:
            raise ConfigError("--max-examples is the former name of --eval-examples: give "
                              "one of them")
        err_console.print("note: --max-examples is deprecated: use --eval-examples (as "
                          "finetune does)", highlight=False, markup=False)
        eval_examples = max_examples
    session, _ = open_eval_session(given, say=None if as_json else print)
    try:
        result = session.evaluate(split, max_examples=eval_examples)
    finally:
        session.close()
    if as_json:
        print(json.dumps(result))
    else:
        em = ("" if "exact_match" not in result else
              f", exact match {result['exact_match']:.4f}" + (
                  f" on {result['groups']} questions" if "groups" in result else ""))
        metric = "F1" if result["metric"] == "f1" else result["metric"]
        print(f"{session.config.data.task} {split}: {metric} {result['score']:.4f} on "
              f"{result['examples']} examples{em}")


CHAT_FIELDS = ("model", "dtype", "trust_remote_code", "profile")


@user_errors
@config_command(cli_fields(names=CHAT_FIELDS), {
    "run_dir": (str | None, typer.Argument(
        None, help="A finetune --output folder (or a saved model); default: --model")),
    "system": (str | None, typer.Option(None, "--system", help="A system message the "
                                        "conversation starts with")),
    "max_new_tokens": (int, typer.Option(256, "--max-new-tokens", min=1,
                                         help="Longest answer, in tokens")),
})
def chat(ctx: typer.Context, given: dict, run_dir: str | None, system: str | None,
         max_new_tokens: int) -> None:
    """Talk with a model in the terminal, its answers streamed as they are written
    (greedy, through the model's chat template). /reset starts over, /exit or Ctrl-D
    ends."""
    from transformers import TextStreamer

    if run_dir is not None:
        given = {**given, "model": run_dir}
    session, _ = open_eval_session({**given, "task": None},
                                   say=lambda line: err_console.print(line, markup=False))
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    streamer = TextStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True)
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                break
            if line.strip() in ("/exit", "/quit"):
                break
            if line.strip() == "/reset" or not line.strip():
                messages = list(start) if line.strip() else messages
                continue
            messages.append({"role": "user", "content": line})
            print("model> ", end="", flush=True)
            answer = session.generate(messages, max_new_tokens, streamer=streamer)[0]
            messages.append({"role": "assistant", "content": answer.strip()})
    finally:
        session.close()


def open_eval_session(given: dict, say=None):
    """A Session on the model `given` names, and what it was found to be (a dict, empty
    for a model edgezo did not save). --model may be what finetune saved: a run folder
    reads as its model/; an adapter folder (a lora, prefix or prompt run's, or a --format
    peft export) is put on the base it trained on, quantized as it was; a saved model is
    scored with the prompt its run trained with unless --template is given. `say(line)`
    hears what was chosen."""
    from edgezo.export.run import saved_model
    from edgezo.run.session import Session

    say = say or (lambda _line: None)
    saved = saved_model(given.get("model"))
    if saved is None:
        return Session(**given), {}
    given = {**given, "model": str(saved.folder)}
    info = {"folder": str(saved.folder), "scheme": saved.scheme}
    trained = None if "template" in given else _trained_template(saved.report, given)
    if trained is not None:
        given["template"] = info["template"] = trained
        say(f"template {trained}, as the model was trained (its report.json); "
            "--template to change")
    if saved.adapter is None:
        return Session(**given), info
    options = saved.base_options()
    info["base"] = options["model"]
    say(f"{saved.scheme} adapter {saved.folder} on base {options['model']}")
    # resident, so that the saved weights are written into the parameters that compute
    session = Session(**{**given, **options, "offload": "off"})
    try:
        _load_adapter(session, saved.folder)
    except BaseException:
        session.close()
        raise
    return session, info


def _load_adapter(session, folder: Path) -> None:
    """The saved adapter's weights into the session's (fresh) adapter of the same shape."""
    import peft
    from safetensors.torch import load_file

    from edgezo.export.run import ADAPTER_FILES

    weights_file = folder / ADAPTER_FILES[1]
    if not weights_file.is_file():
        raise ConfigError(f"{folder} has {ADAPTER_FILES[0]} but no {ADAPTER_FILES[1]}")
    weights = load_file(weights_file)
    try:
        peft.set_peft_model_state_dict(session.model, weights)
    except RuntimeError as err:  # a tensor of another shape
        raise ConfigError(f"the adapter in {folder} does not fit its base "
                          f"{session.config.model.model}: {str(err).splitlines()[-1]}"
                          ) from None
    # peft names the saved and the session's adapter tensors alike (a prompt-learning
    # adapter's are loaded into its prompt encoder, outside the model's state dict)
    unmatched = sorted(set(peft.get_peft_model_state_dict(session.model)) ^ set(weights))
    if unmatched:
        raise ConfigError(f"the adapter in {folder} does not fit its base "
                          f"{session.config.model.model} ({unmatched[0]} has no match)")


def _trained_template(report: dict, given: dict) -> str | None:
    """The prompt template a model saved by edgezo was trained with on the evaluated task
    (from its run's report.json): scored with another prompt, a fine-tuned model can read
    as untrained. None for other models, or another task."""
    from edgezo.config.runconfig import RunConfig
    from edgezo.export.run import trained_template

    return trained_template(report, given.get("task") or RunConfig().get("task"))
