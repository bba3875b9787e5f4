"""The evaluation sweep summary: one row per job, in Hydra's folder for its swept value."""

from gridgen.eval.pipeline import evaluate
from gridgen.eval.report import write_sweep_summary
from tests.helpers.evaluate import check_sweep_summary, make_cfg, make_sweep_inputs


def test_sweep_folders_and_comparison_table(tmp_path):
    """Each job of `-m eval.fake=runs/good/samples,runs/bad/samples` gets Hydra's folder for its number and swept
    value, nested where the value is a path (`0_eval.fake=runs/good/samples/`); the summary compares the jobs."""
    make_sweep_inputs(tmp_path)
    sweep = tmp_path / "sweep"
    for job, name in enumerate(("good", "bad")):
        fake = f"runs/{name}/samples"
        evaluate(make_cfg(tmp_path, "task=interpolate", "eval.metrics=[psnr,ssim]", f"eval.real={tmp_path / 'real'}",
                          f"eval.fake={tmp_path / fake}", f"eval.out='{sweep / f'{job}_eval.fake={fake}'}'"))
    write_sweep_summary(sweep)
    check_sweep_summary(sweep)
