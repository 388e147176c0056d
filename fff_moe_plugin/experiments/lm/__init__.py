"""The language-model experiments: fairseq data-bins (:mod:`.data_bin`), local CPU ranks of fairseq-train
(:mod:`.launch`), the side-by-side comparison (:mod:`.comparison`) and its report (:mod:`.report`). They run fairseq's
command-line tools as subprocesses, with the plugin's ``--user-dir``."""
