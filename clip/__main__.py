"""``python -m clip``: the command line, started as the ``clip`` command starts, by ``clip_dropin_launcher`` (beside
this folder), which first checks that the files of ``clip/`` are the ones this distribution installed."""
try:
    from clip_dropin_launcher import main
except ModuleNotFoundError as error:
    if error.name != "clip_dropin_launcher":
        raise
    from ._cli import main  # this folder copied without the distribution around it: there is no RECORD to check

if __name__ == "__main__":
    raise SystemExit(main())
