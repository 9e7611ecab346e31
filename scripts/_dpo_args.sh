# The main.py flags of the DPO launch scripts (glm4_longwriter_dpo.sh, llama3_longwriter_dpo.sh), sourced by them
# before scripts/_launch.sh: TRAIN_ARGS from MODEL, DATA, OUTPUT, the batch settings and the DPO_* settings.
TRAIN_ARGS=(
  --stage dpo --model_name_or_path "$MODEL" --train_file "$DATA" --output_dir "$OUTPUT"
  --batch_method pack --deepspeed "$DS_CONFIG" --sequence_parallel_size "$SP_SIZE"
  --per_device_train_batch_size "$PER_DEVICE_BATCH" --gradient_accumulation_steps "$GRAD_ACC"
  --num_train_epochs "$EPOCHS" --learning_rate "$LR" --lr_scheduler_type cosine --warmup_steps "$WARMUP"
  --weight_decay 0.0
  --dpo_loss "$DPO_LOSS" --dpo_beta "$DPO_BETA" --dpo_sft_weight "$DPO_SFT_WEIGHT"
  --bf16 "$([[ $BF16 == 1 ]] && echo True || echo False)"
  --gradient_checkpointing "$([[ $GRAD_CKPT == 1 ]] && echo True || echo False)"
  --logging_steps 1 --save_strategy steps --save_steps "$SAVE_STEPS" --save_total_limit 2
  --report_to "$REPORT_TO"
)
if [[ "$DPO_LOSS" == simpo ]]; then
  TRAIN_ARGS+=(--simpo_gamma "$SIMPO_GAMMA")   # reference-free: no reference flags
else
  if [[ "$PRECOMPUTE_REF" == 1 ]]; then TRAIN_ARGS+=(--precompute_ref_logps True); fi
  if [[ -n "$REF_MODEL" ]]; then TRAIN_ARGS+=(--ref_model "$REF_MODEL"); fi
fi
