"""qlora report shows the user's turn of a held-out example, not the template around it."""

from qlora_pipeline.stages.report import display_prompt


def test_display_prompt_keeps_the_last_user_turn_only():
    chatml = (
        "<|im_start|>system\nYou are SmolLM<|im_end|>\n<|im_start|>user\nRecord the contact.\n\n"
        "Regards from Cape Town, Luis Khan<|im_end|>\n<|im_start|>assistant\n"
    )
    assert display_prompt(chatml) == "Record the contact.\nRegards from Cape Town, Luis Khan"
    assert display_prompt("<|user|>\nHi</s>\n<|assistant|>\nHello</s>\n<|user|>\nBye</s>\n<|assistant|>\n") == "Bye"
    alpaca = "### Instruction:\nSay hi\n\n### Response:\n"
    assert display_prompt(alpaca) == "### Instruction:\nSay hi\n### Response:"
