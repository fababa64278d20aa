"""Ways of driving a VM, behind one small interface (base.py): qmp, embedded."""
