"""Feetech STS/SMS (STS3215) control table, baud-rate indices and model numbers, as data.

Addresses and sizes: LeRobot ``motors/feetech/tables.py`` (``STS_SMS_SERIES_CONTROL_TABLE``),
which follows the Feetech STS memory table
(https://www.feetechrc.com/ , transcriptions at wiki.juxitech.com). Sign bits: LeRobot
``encoding_utils.py`` / ``feetech.py``. Defaults are the power-on values from the Feetech table
transcriptions (reference ``servo-buses.md`` §1.1); a few (gains, protection times) are
unverified against a real STS3215 and only seed the emulator.
"""

from __future__ import annotations

from molmoact2_edge.hardware.buses.registers import ControlTable, Register, SignMagnitude

_POS = SignMagnitude(15)  # Goal/Present position and velocity
_OFFSET = SignMagnitude(11)  # Homing_Offset: +-2047 steps
_LOAD = SignMagnitude(10)  # Present_Load: +-1023 (0.1 % PWM duty)


def _ro(name: str, address: int, size: int, default: int = 0, **kw: object) -> Register:
    return Register(name, address, size, writable=False, default=default, **kw)  # type: ignore[arg-type]


def _ee(name: str, address: int, size: int, default: int = 0, **kw: object) -> Register:
    return Register(name, address, size, area="eeprom", default=default, **kw)  # type: ignore[arg-type]


STS3215_MODEL_NUMBER = 777

STS3215_CONTROL_TABLE = ControlTable(
    "sts3215",
    [
        # --- EEPROM, read-only identification
        _ro("Firmware_Major_Version", 0, 1, 3, area="eeprom"),
        _ro("Firmware_Minor_Version", 1, 1, 6, area="eeprom"),
        _ro("Model_Number", 3, 2, STS3215_MODEL_NUMBER, area="eeprom"),
        # --- EEPROM, persistent settings (written with torque off and Lock = 0)
        _ee("ID", 5, 1, 1),
        _ee("Baud_Rate", 6, 1, 0),  # index into BAUD_RATES
        _ee("Return_Delay_Time", 7, 1, 0),  # 2 us units
        _ee("Response_Status_Level", 8, 1, 1),  # 0: reply to READ/PING only, 1: reply to all
        _ee("Min_Position_Limit", 9, 2, 0),
        _ee("Max_Position_Limit", 11, 2, 4095),
        _ee("Max_Temperature_Limit", 13, 1, 70),  # deg C
        _ee("Max_Voltage_Limit", 14, 1, 140),  # 0.1 V
        _ee("Min_Voltage_Limit", 15, 1, 40),  # 0.1 V
        _ee("Max_Torque_Limit", 16, 2, 1000),  # 0.1 %
        _ee("Phase", 18, 1, 12),  # bit 4 = angle-feedback mode (LeRobot clears it)
        _ee("Unloading_Condition", 19, 1, 44),
        _ee("LED_Alarm_Condition", 20, 1, 47),
        _ee("P_Coefficient", 21, 1, 32),
        _ee("D_Coefficient", 22, 1, 32),
        _ee("I_Coefficient", 23, 1, 0),
        _ee("Minimum_Startup_Force", 24, 2, 16),
        _ee("CW_Dead_Zone", 26, 1, 1),
        _ee("CCW_Dead_Zone", 27, 1, 1),
        _ee("Protection_Current", 28, 2, 500),  # 6.5 mA units
        _ee("Angular_Resolution", 30, 1, 1),
        _ee("Homing_Offset", 31, 2, 0, encoding=_OFFSET),  # Present = Actual - Homing_Offset
        _ee("Operating_Mode", 33, 1, 0),  # 0 position, 1 velocity, 2 PWM, 3 step
        _ee("Protective_Torque", 34, 1, 20),  # %
        _ee("Protection_Time", 35, 1, 200),  # 10 ms units
        _ee("Overload_Torque", 36, 1, 80),  # %
        _ee("Velocity_P_Coefficient", 37, 1, 10),
        _ee("Over_Current_Protection_Time", 38, 1, 200),
        _ee("Velocity_I_Coefficient", 39, 1, 1),
        # --- SRAM, control
        Register("Torque_Enable", 40, 1),  # 0 off, 1 on (128: set current position as 2048)
        Register("Acceleration", 41, 1),  # 0 = maximum; ~100 step/s^2 units
        Register("Goal_Position", 42, 2, _POS),
        Register("Goal_Time", 44, 2),
        Register("Goal_Velocity", 46, 2, _POS),  # ~50 step/s units (0.732 rpm), 0 = maximum
        Register("Torque_Limit", 48, 2, default=1000),  # 0.1 %, copied from Max_Torque_Limit
        Register("Lock", 55, 1),  # 0: EEPROM writes persist, 1: locked
        # --- SRAM, feedback (read-only). 56..63 are contiguous: one read of 8 B gets them all.
        _ro("Present_Position", 56, 2, 2048, encoding=_POS),
        _ro("Present_Velocity", 58, 2, encoding=_POS),
        _ro("Present_Load", 60, 2, encoding=_LOAD),
        _ro("Present_Voltage", 62, 1, 120),  # 0.1 V
        _ro("Present_Temperature", 63, 1, 30),  # deg C
        _ro("Status", 65, 1),  # same bits as the status-packet error byte
        _ro("Moving", 66, 1),
        _ro("Present_Current", 69, 2),  # 6.5 mA units
        _ro("Goal_Position_2", 71, 2),
        # --- factory area
        Register("Moving_Velocity_Threshold", 80, 1, area="factory"),
        Register("DTs", 81, 1, area="factory"),  # ms
        Register("Velocity_Unit_Factor", 82, 1, area="factory"),
        Register("Hts", 83, 1, area="factory"),  # ns, firmware >= 2.54
        Register("Maximum_Velocity_Limit", 84, 1, area="factory"),
        Register("Maximum_Acceleration", 85, 1, area="factory"),
        Register("Acceleration_Multiplier", 86, 1, area="factory"),
    ],
)

# Baud_Rate register index -> bits/s. Indices 0-4 agree everywhere; 5-7 follow the official SDK
# (``sms_sts.py``) and Feetech's table; LeRobot lists 57600/38400/19200 there (unverified which
# firmware does what, reference §1.2).
BAUD_RATES = {0: 1_000_000, 1: 500_000, 2: 250_000, 3: 128_000, 4: 115_200, 5: 76_800, 6: 57_600, 7: 38_400}

MODEL_NUMBERS = {777: "sts3215", 2825: "sts3250", 11272: "sm8512bl", 1284: "scs0009"}

# Status-packet error byte (and Status register) bits -> flag names.
ERROR_FLAGS = {0: "voltage", 1: "angle_sensor", 2: "overheat", 3: "overcurrent", 5: "overload"}

RETURN_DELAY_UNIT_S = 2e-6
