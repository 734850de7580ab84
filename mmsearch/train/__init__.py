"""Adapting models: fine-tuning on image-caption pairs (:mod:`.finetune`) and distilling
the image tower into a smaller one (:mod:`.distill`). Pairs in, a model folder out."""
