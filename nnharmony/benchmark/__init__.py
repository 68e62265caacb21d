"""``nnharmony_benchmark``: train the paradigms on the same fold with the same budget, evaluate, report.

In order (:func:`~nnharmony.benchmark.runner.run_benchmark`):

1. **Collection** (:mod:`.collection`): an existing planned collection, one planned here from member ids, or the
   built-in synthetic collection (generated and planned if missing; the quick preset's members carry their own
   fold-0 split).
2. **Training** (:mod:`.training`), in this process through the trainers' Python API, one method after the
   other, each with the same :class:`~.budget.Budget` on fold ``fold`` (the union of each member's nnU-Net fold);
   the supervised methods' final validation predicts every member's validation cases with the member's own plans.
3. **In-context prediction** (:mod:`.incontext`) of the validation cases from support sets of training cases.
4. **Evaluation** (:mod:`.scoring`) against each member's nnU-Net ``gt_segmentations``: Dice and NSD per case,
   rows member x label x method with mean and sample standard deviation over the validation cases; the
   conclusion (:mod:`.conclusion`) is computed from those numbers.
5. **Report** (:mod:`nnharmony.evaluation.report`, :mod:`.figures`): ``results.md``, ``results.csv``,
   ``timing.csv``, ``dice_bar.png``, ``training_curves.png``, ``overlays/``, ``benchmark.json``, ``logs/``.

A method whose trainer cannot be imported is reported as ``skipped`` with the reason, a method whose run fails as
``failed`` with the error; neither gets numbers. :mod:`.progress` shows one line for the whole run.
"""
from nnharmony.benchmark.budget import Budget
from nnharmony.benchmark.methods import DEFAULT_METHODS, METHODS, Method
from nnharmony.benchmark.options import QUICK, BenchmarkOptions, Preset
from nnharmony.benchmark.runner import printed_summary, run_benchmark
from nnharmony.utils.resources import own_peak_rss_mb

__all__ = ["Budget", "DEFAULT_METHODS", "METHODS", "Method", "QUICK", "BenchmarkOptions", "Preset",
           "own_peak_rss_mb", "printed_summary", "run_benchmark"]
