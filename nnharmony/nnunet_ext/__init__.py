"""Point ``nnUNet_extTrainer`` at this folder to use nnharmony's trainers from plain ``nnUNetv2_train``::

    export nnUNet_extTrainer=$(python -c "import nnharmony.nnunet_ext as e; print(e.__path__[0])")

nnU-Net imports the modules of this folder as top-level modules; they re-export the classes of the installed
nnharmony package, so nothing is copied into site-packages and spawned workers can import them.
"""
