"""nnharmony's trainers, found by class name with ``-tr`` (see ``nnharmony.records.model_folder``)."""
from nnharmony.trainers.nnharmony_trainer import nnHarmonyTrainer  # noqa: F401
from nnharmony.trainers.baselines import SeparateHeadsTrainer  # noqa: F401
from nnharmony.trainers.hermes_trainer import HermesTrainer, HermesResEncTrainer  # noqa: F401
from nnharmony.trainers.uharmony_trainer import UHarmonyTrainer, UHarmonyResEncTrainer, UHarmonyOracleTrainer  # noqa: F401
from nnharmony.trainers.universeg_trainer import UniverSegTrainer  # noqa: F401
