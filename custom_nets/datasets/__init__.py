"""Dataset adapters: one module per public dataset (preparation command, label maps, splits and the dataset's own
checks). The generic readers, views and samplers stay in ``custom_nets.data``; nothing there knows a dataset."""
